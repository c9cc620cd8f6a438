"""Submitting: read a prompt file, validate and expand every row into jobs, store conditions, record, dispatch."""
