"""Background worker that runs compression jobs (Celery); implemented with the service (issue 5)."""
