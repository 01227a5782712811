"""API load benchmark: job-status polling latency under 50 concurrent clients, and the server's memory while a
1 GiB model file is uploaded.

    .venv/bin/python -m bench.api_load                       # SQLite, then a throwaway PostgreSQL; writes docs
    .venv/bin/python -m bench.api_load --backends sqlite     # SQLite + local store only (embedded mode)
    .venv/bin/python -m bench.api_load --quick               # SQLite, 3 s phases, 256 MiB upload, docs untouched

The API runs as its own process (uvicorn, one worker, JSON access logs to a file, the job dispatcher
replaced by a recorder), so its RSS is its own and the load generator does not share its interpreter.

* Polling: 50 clients (one asyncio process, one raw keep-alive HTTP/1.1 connection each) GET /v1/jobs/{id} of a
  running job with 8 events; each request authenticates its API key. Two regimes: *paced* (each client
  polls once per second, as a status poller does: 50 req/s in all) and *saturated* (each client sends its
  next request as soon as the last one returns: latency = queueing at the server's capacity).
* Upload: a safetensors file of 1 GiB (header + zeros, a sparse temp file) streamed with PUT
  /v1/models/{id}/files/model.safetensors, then the same size as 16 × 64 MiB multipart parts through
  the local store's presigned part URLs; the server's RSS is sampled every 20 ms throughout.

Goals (issue 5): p99 of status polls ≤ 50 ms at 50 concurrent clients; RSS growth ≤ 64 MiB during the upload.
Results go to docs/BENCHMARKS.md between `<!-- api_load:begin -->` and `<!-- api_load:end -->`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.report import replace_section

MiB = 1 << 20
GiB = 1 << 30
CLIENTS = 50
PACED = "paced (1 poll/s per client)"


# ----------------------------------------------------------------------------- the server process


def serve(data_dir: Path, port: int, database_url: str | None) -> None:
    """Run the API (in the child process)."""
    import uvicorn

    from api.core.config import Settings
    from api.main import create_app
    from api.services.dispatch import RecordingDispatcher

    settings = Settings(data_dir=data_dir, public_url=f"http://127.0.0.1:{port}", database_url=database_url,
                        secret_key="bench-secret-0123456789abcdef")
    app = create_app(settings, dispatcher=RecordingDispatcher(), migrate=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    ps: psutil.Process

    def rss(self) -> int:
        return self.ps.memory_info().rss


def start_server(data_dir: Path, database_url: str | None) -> Server:
    from services import free_ports  # tests/services.py

    port = free_ports(1)[0]
    args = [sys.executable, "-m", "bench.api_load", "--serve", "--data-dir", str(data_dir), "--port", str(port)]
    if database_url:
        args += ["--database-url", database_url]
    env = os.environ | {"OMP_NUM_THREADS": "1", "NWC_DATA_DIR": str(data_dir)}
    log = (data_dir / "server.log").open("wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=Path(__file__).resolve().parent.parent)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return Server(proc, url, psutil.Process(proc.pid))
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {(data_dir / 'server.log').read_text()[-2000:]}")
        time.sleep(0.1)
    raise RuntimeError("server did not start")


def make_key(database_url: str) -> str:
    from api import admin
    from api.db.migrate import upgrade
    from api.db.session import make_engine, make_session_factory, session_scope

    upgrade(database_url)
    engine = make_engine(database_url, null_pool=True)
    with session_scope(make_session_factory(engine)) as s:
        _, _, token = admin.create_key(s, "bench", create=True)
        admin.set_limits(s, "bench", max_concurrent_jobs=1000, max_storage_bytes=None)
    engine.dispose()
    return token


def running_job(c: httpx.Client, database_url: str) -> str:
    """A ready model and a job that looks half done (8 events, as a running worker leaves them)."""
    import numpy as np
    from safetensors.numpy import save

    from api.db.models import Job, JobEvent, JobState
    from api.db.session import make_engine, make_session_factory, session_scope
    from api.db.types import utcnow

    mid = c.post("/v1/models", json={"name": "bench"}).raise_for_status().json()["id"]
    c.put(f"/v1/models/{mid}/files/model.safetensors",
          content=save({"w": np.zeros((64, 64), np.float32)})).raise_for_status()
    c.put(f"/v1/models/{mid}/files/config.json", content=b'{"model_type": "llama"}').raise_for_status()
    c.post(f"/v1/models/{mid}/finalize").raise_for_status()
    jid = c.post("/v1/jobs", json={"model_id": mid, "target_bits": 4}).raise_for_status().json()["id"]
    engine = make_engine(database_url, null_pool=True)
    with session_scope(make_session_factory(engine)) as s:
        job = s.get(Job, jid)
        job.state, job.stage, job.progress, job.started_at = JobState.RUNNING, "compress", 0.42, utcnow()
        for stage, kind, data in [("fetch", "stage", {"attempt": 1}), ("fetch", "stage", {"files": 2, "bytes": 1}),
                                  ("plan", "stage", {"attempt": 1}), ("plan", "stage", {"tensors": 30}),
                                  ("compress", "stage", {"attempt": 1}), ("compress", "log", {}),
                                  ("compress", "checkpoint", {"units": 3})]:
            s.add(JobEvent(job_id=jid, stage=stage, kind=kind, message=f"{stage} {kind}", data=data))
    engine.dispose()
    return jid


# ----------------------------------------------------------------------------- polling


def pctl(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s)) - 1))]


def poll(server: Server, token: str, job_id: str, seconds: float, interval: float | None) -> dict[str, Any]:
    """One polling regime; adds the server's CPU time per request (independent of how busy the cores are)."""
    t0 = server.ps.cpu_times()
    r = asyncio.run(_poll(server.url, token, job_id, seconds, interval))
    t1 = server.ps.cpu_times()
    r["server_cpu_ms"] = 1000 * (t1.user + t1.system - t0.user - t0.system) / max(r["requests"], 1)
    return r


async def _poll(url: str, token: str, job_id: str, seconds: float, interval: float | None) -> dict[str, Any]:
    """50 keep-alive HTTP/1.1 connections speaking raw asyncio streams: the load generator shares the cores
    with the server, so it is kept to a few dozen microseconds of CPU per request (httpx would cost more than
    the server's own work)."""
    host, port = url.removeprefix("http://").split(":")
    request = (f"GET /v1/jobs/{job_id} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
               "Accept: application/json\r\n\r\n").encode()
    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def client(i: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            if interval:
                await asyncio.sleep(random.Random(i).uniform(0, interval))  # spread the clients over the second
            nxt = time.perf_counter()
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:")))
                body = await reader.readexactly(length)
                lat.append(time.perf_counter() - t0)
                if not head.startswith(b"HTTP/1.1 200") or not body.startswith(b"{"):
                    errors += 1
                if interval:
                    nxt += interval
                    await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    wall = time.perf_counter() - t0
    return {"requests": len(lat), "errors": errors, "rps": len(lat) / wall, "p50_ms": 1000 * pctl(lat, 50),
            "p90_ms": 1000 * pctl(lat, 90), "p99_ms": 1000 * pctl(lat, 99), "max_ms": 1000 * max(lat),
            "mean_ms": 1000 * statistics.fmean(lat)}


# ----------------------------------------------------------------------------- upload


class RssSampler:
    def __init__(self, server: Server, period: float = 0.02) -> None:
        self.server, self.period = server, period
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.server.rss())
            time.sleep(self.period)

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.server.rss())


def big_safetensors(path: Path, size: int) -> None:
    """A valid safetensors file of `size` bytes: one U8 tensor whose data is a sparse hole of zeros."""
    width = 128  # header padded with spaces to a fixed width (the format allows it), so its length is known
    data = size - 8 - width
    header = json.dumps({"blob": {"dtype": "U8", "shape": [data], "data_offsets": [0, data]}}).ljust(width)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", width) + header.encode())
        f.truncate(size)


def _chunks(path: Path, start: int = 0, length: int | None = None):
    with path.open("rb") as f:
        f.seek(start)
        left = length if length is not None else path.stat().st_size - start
        while left > 0:
            chunk = f.read(min(MiB, left))
            left -= len(chunk)
            yield chunk


def upload_single(server: Server, c: httpx.Client, path: Path) -> dict[str, Any]:
    mid = c.post("/v1/models", json={"name": "big"}).raise_for_status().json()["id"]
    size = path.stat().st_size
    before = server.rss()
    t0 = time.perf_counter()
    with RssSampler(server) as s:
        r = c.put(f"/v1/models/{mid}/files/model.safetensors", content=_chunks(path),
                  headers={"Content-Length": str(size)}, timeout=600)
    wall = time.perf_counter() - t0
    r.raise_for_status()
    after = server.rss()
    c.delete(f"/v1/models/{mid}")
    return {"mode": "single PUT", "bytes": size, "seconds": wall, "rss_before": before, "rss_peak": s.peak,
            "rss_after": after}


def upload_multipart(server: Server, c: httpx.Client, path: Path) -> dict[str, Any]:
    mid = c.post("/v1/models", json={"name": "big-mp"}).raise_for_status().json()["id"]
    size = path.stat().st_size
    up = c.post(f"/v1/models/{mid}/uploads", json={"path": "model.safetensors", "size": size}).raise_for_status()
    up = up.json()
    part = up["part_size"]
    numbers = list(range(1, up["part_count"] + 1))
    urls = c.post(f"/v1/models/{mid}/uploads/{up['upload_id']}/parts",
                  json={"part_numbers": numbers}).raise_for_status().json()["parts"]
    before = server.rss()
    t0 = time.perf_counter()
    etags = []
    with RssSampler(server) as s, httpx.Client(timeout=600) as plain:
        for p in urls:
            off = (p["part_number"] - 1) * part
            n = min(part, size - off)
            r = plain.put(p["url"], content=_chunks(path, off, n), headers={"Content-Length": str(n)})
            r.raise_for_status()
            etags.append({"part_number": p["part_number"], "etag": r.headers["etag"]})
        c.post(f"/v1/models/{mid}/uploads/{up['upload_id']}/complete", json={"parts": etags},
               timeout=600).raise_for_status()
    wall = time.perf_counter() - t0
    after = server.rss()
    c.delete(f"/v1/models/{mid}")
    return {"mode": f"multipart ({len(numbers)} × {part // MiB} MiB, presigned)", "bytes": size, "seconds": wall,
            "rss_before": before, "rss_peak": s.peak, "rss_after": after}


# ----------------------------------------------------------------------------- report


def render(results: list[dict[str, Any]], wall: float, cmd: str) -> str:
    first, last = results[0], results[-1]
    la0, la1 = first["load_before"], last["load_after"]
    cores = os.cpu_count()
    # A 1-minute load average of 1 or more before the first server starts: other processes had the cores.
    shared = la0[0] >= 1.0
    lines = [
        "## API load: status polling and upload memory",
        "",
        f"Command: `{cmd}` (wall time {wall / 60:.1f} min).  ",
        f"Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC.  ",
        f"Machine: {platform.platform()}, `os.cpu_count()` = {cores}, Python {platform.python_version()}, "
        f"uvicorn {first['uvicorn']} ({first['http']}, {first['loop']}), one worker process, local object store. "
        "The load generator runs on the same cores. Load average at start / end: "
        f"{la0[0]:.1f}, {la0[1]:.1f}, {la0[2]:.1f} / {la1[0]:.1f}, {la1[1]:.1f}, {la1[2]:.1f}"
        + (" (the cores were shared with other jobs)." if shared else "."),
        "",
        f"**Job status polls** — {CLIENTS} concurrent clients, GET /v1/jobs/{{id}} (API-key auth, job + 8 events "
        f"read, stages and metrics computed), {first['seconds']:.0f} s per regime:",
        "",
        "| database | regime | requests | req/s | errors | p50 ms | p90 ms | p99 ms | max ms | server CPU ms/req |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        for name, r in res["polls"].items():
            lines.append(f"| {res['database']} | {name} | {r['requests']} | {r['rps']:.0f} | {r['errors']} | "
                         f"{r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} | "
                         f"{r['server_cpu_ms']:.2f} |")
    verdicts = ", ".join(
        f"{res['database']}: **{'met' if res['polls'][PACED]['p99_ms'] <= 50 else 'not met'}** "
        f"(p99 {res['polls'][PACED]['p99_ms']:.1f} ms)" for res in results)
    lines += [
        "",
        f"Goal p99 ≤ 50 ms at 50 clients, paced regime: {verdicts}. Saturated, every client waits for the other 49 "
        "requests ahead of it, so latency there is 50 / throughput: it measures capacity, not the poll path. "
        "Server CPU per request is the API process's CPU time over the phase divided by its requests; it grows "
        "when the cores are contended (cache misses, preemption), and the latencies grow far more: the load "
        "generator, the API, PostgreSQL (when used)" + (" and other people's jobs" if shared else "")
        + f" all ran on the same {cores} cores. A poll makes 4 queries (API key, job, events, artifact count) plus, "
        "on PostgreSQL, the pool's pre-ping and the rollback when the connection returns to the pool.",
        "",
        f"**Upload memory** — a {first['upload_bytes'] / GiB:.2f} GiB safetensors file streamed to the server; RSS "
        "of the API process sampled every 20 ms:",
        "",
        "| database | upload | seconds | MB/s | RSS before MiB | peak MiB | growth MiB | after MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        for u in res["uploads"]:
            growth = (u["rss_peak"] - u["rss_before"]) / MiB
            lines.append(f"| {res['database']} | {u['mode']} | {u['seconds']:.1f} | "
                         f"{u['bytes'] / u['seconds'] / 1e6:.0f} | {u['rss_before'] / MiB:.0f} | "
                         f"{u['rss_peak'] / MiB:.0f} | {growth:.1f} | {u['rss_after'] / MiB:.0f} |")
    worst = max((u["rss_peak"] - u["rss_before"]) / MiB for res in results for u in res["uploads"])
    lines += [
        "",
        f"Goal RSS growth ≤ 64 MiB: **{'met' if worst <= 64 else 'not met'}** (worst {worst:.1f} MiB). The body "
        "is pulled from the socket 1 MiB at a time by the store writer's thread (uvicorn stops reading while the "
        "writer is busy) and hashed as it goes; the file lands on disk through the store's temp file, so the "
        "page cache grows, not the process. The server's RSS before the upload includes the polling phases.",
    ]
    return "\n".join(lines)


def _which(fast: str, fallback: str) -> str:
    """What uvicorn's "auto" settings pick: the C implementation when it is installed."""
    try:
        mod = __import__(fast)
        return f"{fast} {mod.__version__}"
    except ImportError:
        return fallback


def run_one(backend: str, seconds: float, upload_bytes: int) -> dict[str, Any]:
    """Start the API over `backend` ("sqlite" or "postgres"), poll, upload; the server is stopped after."""
    import uvicorn

    tmp = Path(tempfile.mkdtemp(prefix="nwc-api-load-"))
    pg = None
    server = None
    try:
        if backend == "postgres":
            from services import PostgresServer

            os.chmod(tmp, 0o755)  # the postgres user (as root we run the server as it) must reach its directory
            pg = PostgresServer(tmp)
            pg.start()
            database_url = pg.new_database("bench")
        else:
            database_url = f"sqlite:///{tmp / 'data' / 'nwc.db'}"
        (tmp / "data").mkdir(exist_ok=True)
        token = make_key(database_url)
        server = start_server(tmp / "data", database_url)
        res: dict[str, Any] = {"uvicorn": uvicorn.__version__, "http": _which("httptools", "h11"),
                               "loop": _which("uvloop", "asyncio loop"),
                               "database": f"PostgreSQL {pg.bin.parent.name}" if pg else "SQLite (WAL)",
                               "seconds": seconds,
                               "load_before": os.getloadavg(), "upload_bytes": upload_bytes}
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
            job_id = running_job(c, database_url)
            for _ in range(200):  # warm-up: imports, caches, connection pool
                c.get(f"/v1/jobs/{job_id}").raise_for_status()
            res["polls"] = {
                PACED: poll(server, token, job_id, seconds, 1.0),
                "saturated (no pause)": poll(server, token, job_id, seconds, None),
            }
            for name, r in res["polls"].items():
                print(f"{res['database']} {name}: {r['requests']} requests, {r['rps']:.0f}/s, p50 "
                      f"{r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, errors {r['errors']}, server CPU "
                      f"{r['server_cpu_ms']:.2f} ms/req", flush=True)
            big = tmp / "big.safetensors"
            big_safetensors(big, upload_bytes)
            res["uploads"] = [upload_single(server, c, big), upload_multipart(server, c, big)]
            for u in res["uploads"]:
                print(f"{res['database']} {u['mode']}: {u['seconds']:.1f} s, RSS {u['rss_before'] / MiB:.0f} → "
                      f"peak {u['rss_peak'] / MiB:.0f} MiB (+{(u['rss_peak'] - u['rss_before']) / MiB:.1f})",
                      flush=True)
        res["load_after"] = os.getloadavg()
        return res
    finally:
        if server is not None:
            server.proc.terminate()
            try:
                server.proc.wait(20)
            except subprocess.TimeoutExpired:
                server.proc.kill()
        if pg is not None:
            pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--database-url", help=argparse.SUPPRESS)
    ap.add_argument("--backends", default=None, help="sqlite,postgres (default both; --quick: sqlite)")
    ap.add_argument("--quick", action="store_true", help="short phases and a 256 MiB upload; docs untouched")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per polling regime (default 15)")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    args = ap.parse_args()
    if args.serve:
        serve(args.data_dir, args.port, args.database_url)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    seconds = args.seconds or (3.0 if args.quick else 15.0)
    upload_bytes = 256 * MiB if args.quick else GiB
    backends = (args.backends or ("sqlite" if args.quick else "sqlite,postgres")).split(",")
    t_start = time.time()
    results = [run_one(b.strip(), seconds, upload_bytes) for b in backends]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
    cmd = ".venv/bin/python -m bench.api_load" + (f" --backends {args.backends}" if args.backends else "") + (
        f" --seconds {args.seconds:g}" if args.seconds else "")
    body = render(results, time.time() - t_start, cmd)
    print(body)
    if not args.quick:
        replace_section("api_load", body)


if __name__ == "__main__":
    main()
