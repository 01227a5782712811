"""The real-server harness itself: each server answers, on loopback, and stops by PID."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import redis
from services import (  # noqa: F401  (pytest fixtures)
    MissingServerBinary,
    PostgresServer,
    S3Config,
    _alive,
    postgres_server,
    postgres_url,
    redis_url,
    s3_config,
    stop_pid,
)


def test_postgres(postgres_url: str) -> None:  # noqa: F811
    assert "127.0.0.1" in postgres_url
    with psycopg.connect(postgres_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("app",)
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)


def test_redis(redis_url: str) -> None:  # noqa: F811
    client = redis.Redis.from_url(redis_url)
    try:
        client.set("k", "v")
        assert client.get("k") == b"v"
        assert client.config_get("bind")["bind"] == "127.0.0.1"
    finally:
        client.close()


def test_s3(s3_config: S3Config) -> None:  # noqa: F811
    assert s3_config.endpoint_url.startswith("http://127.0.0.1:")
    s3_config.store().ping()


def test_stop_pid_escalates_to_sigkill() -> None:
    import signal
    import subprocess
    import sys

    # A child that ignores SIGTERM: stop_pid must still end it.
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    stop_pid(proc.pid, signal.SIGTERM, timeout=0.5, proc=proc)
    assert proc.returncode == -signal.SIGKILL
    assert not _alive(proc.pid)


def test_missing_binary_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import services

    monkeypatch.setattr(services.glob, "glob", lambda pattern: [])
    with pytest.raises(MissingServerBinary, match="scripts/setup.sh"):
        PostgresServer(tmp_path)
