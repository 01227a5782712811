"""Object-store key layout. Every key starts with the tenant, so a prefix never spans two tenants.

    tenants/<tenant>/models/<model>/files/<path>          uploaded or imported model files
    tenants/<tenant>/models/<model>/uploads/<upload>.json  open multipart uploads (what to abort on delete)
    tenants/<tenant>/calibration/<cal>/<name>              uploaded calibration text
    tenants/<tenant>/jobs/<job>/...                        everything a job produces (the worker writes here)
"""

from __future__ import annotations

__all__ = [
    "tenant_prefix",
    "model_prefix",
    "model_file_key",
    "model_files_prefix",
    "upload_marker_key",
    "uploads_prefix",
    "calibration_prefix",
    "calibration_key",
    "job_prefix",
    "artifact_key",
]


def tenant_prefix(tenant_id: str) -> str:
    return f"tenants/{tenant_id}/"


def model_prefix(tenant_id: str, model_id: str) -> str:
    return f"tenants/{tenant_id}/models/{model_id}/"


def model_files_prefix(tenant_id: str, model_id: str) -> str:
    return model_prefix(tenant_id, model_id) + "files/"


def model_file_key(tenant_id: str, model_id: str, path: str) -> str:
    return model_files_prefix(tenant_id, model_id) + path


def uploads_prefix(tenant_id: str, model_id: str) -> str:
    return model_prefix(tenant_id, model_id) + "uploads/"


def upload_marker_key(tenant_id: str, model_id: str, upload_id: str) -> str:
    return uploads_prefix(tenant_id, model_id) + f"{upload_id}.json"


def calibration_prefix(tenant_id: str, cal_id: str | None = None) -> str:
    base = f"tenants/{tenant_id}/calibration/"
    return base if cal_id is None else f"{base}{cal_id}/"


def calibration_key(tenant_id: str, cal_id: str, name: str) -> str:
    return calibration_prefix(tenant_id, cal_id) + name


def job_prefix(tenant_id: str, job_id: str) -> str:
    return f"tenants/{tenant_id}/jobs/{job_id}/"


def artifact_key(tenant_id: str, job_id: str, name: str) -> str:
    """Where the worker should store an artifact called `name` of a job (deleted with the job)."""
    return job_prefix(tenant_id, job_id) + name
