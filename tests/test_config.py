"""Service settings: embedded defaults under one data directory, NWC_ environment overrides, the signing secret."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from api.core.config import Settings, get_settings


def test_embedded_defaults_live_under_data_dir(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path)
    assert s.db_url == f"sqlite:///{tmp_path / 'nwc.db'}"
    assert s.objects_dir == tmp_path / "objects"
    assert s.store_backend == "local"
    assert s.result_backend == f"db+sqlite:///{tmp_path / 'celery-results.db'}"
    assert s.presign_ttl_seconds == 900  # the default docs/DEPLOY.md and docs/API.md state


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = {
        "NWC_DATA_DIR": str(tmp_path),
        "NWC_DATABASE_URL": "postgresql+psycopg://u@db:5432/nwc",
        "NWC_BROKER_URL": "redis://redis:6379/0",
        "NWC_STORE_BACKEND": "s3",
        "NWC_S3_ENDPOINT_URL": "http://s3:8333",
        "NWC_S3_ACCESS_KEY": "ak",
        "NWC_S3_SECRET_KEY": "s3-secret-value",
        "NWC_S3_BUCKET": "weights",
        "NWC_PRESIGN_TTL_SECONDS": "60",
        "NWC_TENANT_MAX_CONCURRENT_JOBS": "5",
        "NWC_SECRET_KEY": "from-env",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    try:
        s = get_settings()
        assert get_settings() is s  # cached
        assert s.db_url == env["NWC_DATABASE_URL"] and s.broker_url == env["NWC_BROKER_URL"]
        assert (s.store_backend, s.s3_bucket, s.presign_ttl_seconds) == ("s3", "weights", 60)
        assert s.tenant_max_concurrent_jobs == 5
        assert s.secret_bytes() == b"from-env"
        assert "s3-secret-value" not in repr(s) and "from-env" not in repr(s)  # secrets stay out of logs
    finally:
        get_settings.cache_clear()


def test_invalid_values_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, store_backend="ftp")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, presign_ttl_seconds=8 * 24 * 3600)


def test_generated_secret_is_persisted_and_shared(tmp_path: Path) -> None:
    a = Settings(data_dir=tmp_path).secret_bytes()
    b = Settings(data_dir=tmp_path).secret_bytes()  # another process on the same machine reads the same key
    assert a == b and len(a) == 64
    mode = stat.S_IMODE(os.stat(tmp_path / "secret.key").st_mode)
    assert mode == 0o600
    assert Settings(data_dir=tmp_path / "other").secret_bytes() != a
