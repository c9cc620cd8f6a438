"""Small real services for tests: an S3 HTTP server, free ports."""
