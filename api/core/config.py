"""Service configuration, read from the environment (prefix ``NWC_``).

Every setting has a default that makes the embedded mode (`nwc serve`: SQLite, a local
object directory, a local worker) work with no configuration; production sets the database,
broker and S3 variables. Derived defaults (paths under ``data_dir``) are filled in after
validation so that changing ``NWC_DATA_DIR`` alone moves everything.
"""

from __future__ import annotations

import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings", "default_data_dir"]

GiB = 1 << 30
# SigV4 presigned URLs cannot live longer than 7 days; the local store's URLs (api.storage) keep the same bound.
MAX_PRESIGN_TTL = 7 * 24 * 3600


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "nwc"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NWC_", extra="ignore", validate_default=True)

    data_dir: Path = Field(default_factory=default_data_dir)

    # Persistence. None = SQLite file under data_dir (embedded mode).
    database_url: str | None = None

    # Queue. Embedded mode uses kombu's filesystem transport under data_dir (wired by the worker step);
    # production sets redis://... for both.
    broker_url: str = "filesystem://"
    result_backend: str | None = None

    # Object store.
    store_backend: Literal["local", "s3"] = "local"
    store_dir: Path | None = None
    s3_endpoint_url: str | None = None
    # Clients outside the deployment may reach S3 under another name than the API does
    # (e.g. a compose service name inside, a public host outside); presigned URLs use this one.
    s3_presign_endpoint_url: str | None = None
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_bucket: str = "nwc"
    s3_region: str = "us-east-1"
    presign_ttl_seconds: int = Field(default=900, gt=0, le=MAX_PRESIGN_TTL)

    # Base URL clients use to reach this API; the local store's presigned URLs point under it.
    public_url: str = "http://127.0.0.1:8000"

    # Limits. The tenant values are defaults; a tenant row may override them.
    upload_max_bytes: int = Field(default=200 * GiB, gt=0)
    tenant_max_concurrent_jobs: int = Field(default=2, gt=0)
    tenant_max_storage_bytes: int = Field(default=1024 * GiB, gt=0)

    # Worker (worker/): time limits of one job attempt, leases, retries, webhooks.
    # The hard limit kills the task; the soft one raises inside it first so it can record the failure.
    job_soft_time_limit: int = Field(default=6 * 3600, gt=0)
    job_time_limit: int = Field(default=6 * 3600 + 300, gt=0)
    # A running job's lease: renewed every lease_heartbeat_seconds; expired = the worker is gone.
    lease_seconds: float = Field(default=120.0, gt=0)
    lease_heartbeat_seconds: float = Field(default=5.0, gt=0)
    # How often each worker's reaper looks for expired leases (also once at worker start).
    reaper_interval_seconds: float = Field(default=30.0, gt=0)
    # A queued job not claimed for this long is sent to the broker again (a lost message; duplicates are harmless).
    queued_resend_seconds: float = Field(default=900.0, gt=0)
    # A job that has been started this many times without finishing is failed by the reaper.
    job_max_attempts: int = Field(default=3, gt=0)
    # Local scratch space of the worker (downloaded models, compression output). None = data_dir/work.
    work_dir: Path | None = None
    # Device for compression and verification: auto = CUDA when present, else cpu (decided in the job process,
    # never in the worker's parent, which must not initialize CUDA).
    worker_device: str = "auto"
    # Model-free jobs on models with at least this many safetensors shards fan out one unit per shard across workers
    # (worker/fanout.py); 0 = never.
    fanout_min_shards: int = Field(default=2, ge=0)
    # Celery prefork children are replaced after this many tasks (frees GPU memory between jobs); 0 = never.
    worker_max_tasks_per_child: int = Field(default=0, ge=0)
    # Webhooks on terminal job states: POST attempts, first backoff (doubles each time), per-request timeout.
    webhook_attempts: int = Field(default=5, gt=0)
    webhook_backoff_seconds: float = Field(default=2.0, ge=0)
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    # Webhooks go to public addresses only (api/egress.py); true lets them reach private and loopback ones.
    webhook_allow_private: bool = False

    # None = huggingface_hub's own default (which honours HF_ENDPOINT).
    hf_endpoint: str | None = None
    # Whether an import request may name its own Hub endpoint (off: the server would fetch any URL a caller names).
    hf_allow_request_endpoint: bool = False

    # Signs local-store presigned URLs and webhook bodies. None = a random key kept in
    # data_dir/secret.key, so API and worker processes on one machine agree across restarts.
    secret_key: SecretStr | None = None

    _secret_cache: bytes | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _fill_derived(self) -> Settings:
        self.data_dir = self.data_dir.expanduser()
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'nwc.db'}"
        if self.store_dir is None:
            self.store_dir = self.data_dir / "objects"
        if self.result_backend is None:
            self.result_backend = f"db+sqlite:///{self.data_dir / 'celery-results.db'}"
        if self.work_dir is None:
            self.work_dir = self.data_dir / "work"
        if self.job_time_limit <= self.job_soft_time_limit:
            raise ValueError("NWC_JOB_TIME_LIMIT must be above NWC_JOB_SOFT_TIME_LIMIT")
        if self.lease_heartbeat_seconds >= self.lease_seconds:
            raise ValueError("NWC_LEASE_HEARTBEAT_SECONDS must be below NWC_LEASE_SECONDS")
        if self.store_backend == "s3" and not self.s3_bucket:
            raise ValueError("NWC_STORE_BACKEND=s3 needs NWC_S3_BUCKET")
        return self

    @property
    def db_url(self) -> str:
        """database_url after defaulting (never None once validated); typed for callers."""
        assert self.database_url is not None
        return self.database_url

    @property
    def scratch_dir(self) -> Path:
        """work_dir after defaulting; typed for callers."""
        assert self.work_dir is not None
        return self.work_dir

    @property
    def objects_dir(self) -> Path:
        assert self.store_dir is not None
        return self.store_dir

    def secret_bytes(self) -> bytes:
        """The signing secret: NWC_SECRET_KEY, else the persisted random key (created on first use)."""
        if self._secret_cache is None:
            if self.secret_key is not None:
                self._secret_cache = self.secret_key.get_secret_value().encode()
            else:
                self._secret_cache = _load_or_create_secret(self.data_dir / "secret.key")
        return self._secret_cache


def _load_or_create_secret(path: Path) -> bytes:
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32).encode()
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(value)
    try:
        # link() publishes a complete file and fails if one exists: when two processes start
        # together exactly one key wins and both read it, never a half-written file.
        os.link(tmp, path)
    except FileExistsError:
        value = path.read_bytes().strip()
    finally:
        tmp.unlink()
    return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings; tests call ``get_settings.cache_clear()`` after changing the environment."""
    return Settings()
