"""HTTP API for compression jobs (FastAPI service); implemented in issue 5."""
