"""Dispatch: the Celery configuration, routing jobs to pools, and publishing pending jobs as id-only tasks."""
