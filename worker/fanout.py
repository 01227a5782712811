"""Model-free compression of a multi-shard model, fanned out per shard across workers (docs/DEPLOY.md
"Model-free fan-out per shard"; the codec side is codec/shards.py).

The job's own task is the coordinator (worker/jobs.py stage_compress calls `compress_fanout`). It runs two phases
of units, one unit per shard: `plan` (rate curves + digests), then, after the coordinator's allocation, `encode`
(a shard container closed-loop on its byte budget). For each unit whose result is missing it sends one
`nwc.shard_unit` task to the `gpu` queue, then polls the object store for the results while its lease keeps
beating, and runs itself any unit that nobody has claimed or whose claim went stale (no refresh for
`lease_seconds`): a SIGKILLed helper loses nothing, and with no free helper the coordinator does all units.
Then it merges the parts into the bundle. Everything is under the job's prefix:

    work/shards/units.json          the shards (file, object key, sha256, first tensor index, parameters), codec, seed
    work/shards/<i>/plan.json       plan unit result (codec.shards.ShardPlan)
    work/shards/<i>/budget.json     shard i's part of the allocation (codec.shards.ShardBudget), by the coordinator
    work/shards/<i>/part.nwc        encode unit result: the shard container
    work/shards/<i>/part.json       its per-tensor reports and sha256; written after part.nwc: the result marker
    work/shards/<i>/<phase>.claim   who runs the unit (owner, Celery node) and when it last said so; done when over

Units are idempotent and deterministic: a unit whose result exists is skipped, a duplicate overwrites the same
keys with the same content. A redelivered coordinator skips the units whose results exist.

Module level imports no torch (the worker's parent imports worker.tasks); the codec is imported in functions.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from api.core.config import Settings
from api.db.models import Job, JobState, ModelFile
from api.services.keys import job_prefix
from api.storage import ObjectStore, make_store, read_all
from worker.db import session_factory
from worker.jobs import JobContext, download_checked, get_json, put_json, upload_file
from worker.lease import worker_identity

if TYPE_CHECKING:
    from codec.pipeline import CompressReport
    from codec.source import ModelSource

__all__ = ["FanoutSpec", "ShardKeys", "UnitRunner", "fanout_spec", "compress_fanout", "run_shard_unit",
           "send_unit"]

log = logging.getLogger(__name__)

PHASES = ("plan", "encode")
POLL_S = 0.5
# Progress of the compress stage per phase (units weighted by shard parameters); merging takes the rest.
_PHASE_RANGE = {"plan": (0.0, 0.4), "encode": (0.4, 0.95)}


class UnitAborted(Exception):
    """The unit's job ended (cancelled, failed or finished elsewhere) while a helper ran the unit."""


@dataclass(frozen=True)
class UnitShard:
    index: int
    file: str
    key: str  # the model file's object key
    sha256: str
    size: int
    first_index: int  # position of the shard's first tensor in the model (seeds its rate curves)
    numel: int


@dataclass(frozen=True)
class FanoutSpec:
    """work/shards/units.json: everything a unit needs besides its shard file and (encode) its budget."""

    codec_id: str
    codec_sha256: str
    seed: int
    bits: float
    shards: tuple[UnitShard, ...]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FanoutSpec:
        return cls(d["codec_id"], d["codec_sha256"], d["seed"], d["bits"], tuple(UnitShard(**s) for s in d["shards"]))


@dataclass(frozen=True)
class ShardKeys:
    prefix: str  # the job's prefix

    @property
    def base(self) -> str:
        return self.prefix + "work/shards/"

    @property
    def units(self) -> str:
        return self.base + "units.json"

    def plan(self, i: int) -> str:
        return f"{self.base}{i}/plan.json"

    def budget(self, i: int) -> str:
        return f"{self.base}{i}/budget.json"

    def part(self, i: int) -> str:
        return f"{self.base}{i}/part.nwc"

    def part_report(self, i: int) -> str:
        return f"{self.base}{i}/part.json"

    def result(self, i: int, phase: str) -> str:
        return self.plan(i) if phase == "plan" else self.part_report(i)

    def claim(self, i: int, phase: str) -> str:
        return f"{self.base}{i}/{phase}.claim"


def node_name() -> str:
    """The Celery node running this code (`nwc worker --hostname`), else the host name."""
    from celery import current_task

    return getattr(getattr(current_task, "request", None), "hostname", None) or socket.gethostname()


def claim_is_live(claim: dict[str, Any] | None, lease_s: float) -> bool:
    """Someone runs the unit and said so within the lease time (wall clock: claims cross machines)."""
    return claim is not None and not claim.get("done") and time.time() - float(claim["at"]) < lease_s


def _read_text(store: ObjectStore, key: str) -> str:
    return read_all(store, key).decode()


class _ClaimHeartbeat(threading.Thread):
    """Refreshes a unit's claim every `interval` s; `alive` (if given) is asked first, and a False stops the unit."""

    def __init__(self, store: ObjectStore, key: str, claim: dict[str, Any], interval: float,
                 alive: Callable[[], bool] | None) -> None:
        super().__init__(name=f"claim-{key.rsplit('/', 2)[-2]}", daemon=True)
        self.store, self.key, self.claim, self.interval, self.alive = store, key, claim, interval, alive
        self.aborted = threading.Event()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                if self.alive is not None and not self.alive():
                    self.aborted.set()
                    return
                put_json(self.store, self.key, {**self.claim, "at": time.time()})
            except Exception:  # a store or DB hiccup: the next beat retries; the claim has slack for a few misses
                log.exception("claim heartbeat %s failed", self.key)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


_codecs: dict[tuple[str, str], Any] = {}


def _tensor_codec(spec: FanoutSpec, device: str) -> Any:
    """The job's codec on this device (cached per process: a helper runs many units)."""
    key = (spec.codec_id, device)
    if key not in _codecs:
        from codec.registry import CodecIntegrityError, load_codec
        from codec.tensor_codec import NWCTensorCodec

        codec = load_codec(spec.codec_id)
        if codec.info.sha256 != spec.codec_sha256:
            raise CodecIntegrityError(f"codec {spec.codec_id} here is not the one the job's coordinator uses")
        _codecs[key] = NWCTensorCodec(codec, device)
    return _codecs[key]


@dataclass
class UnitRunner:
    """Runs units of one job: claims, heartbeats the claim, computes, publishes the result, marks the claim done."""

    store: ObjectStore
    keys: ShardKeys
    spec: FanoutSpec
    shard_dir: Path  # holds the shard files this runner works on
    work_dir: Path  # scratch for shard containers
    device: str
    node: str
    heartbeat_s: float
    check: Callable[[], None] = lambda: None  # cancellation point (raises)
    alive: Callable[[], bool] | None = None  # asked on each claim refresh and before publishing
    owner: str = field(default_factory=worker_identity)

    def _check(self, beat: _ClaimHeartbeat) -> None:
        if beat.aborted.is_set():
            raise UnitAborted(beat.key)
        self.check()

    def run(self, phase: str, index: int) -> float:
        """Run one unit; returns its seconds."""
        from codec.shards import ShardBudget, ShardSpec, encode_shard, plan_shard
        from codec.source import open_source

        t0 = time.monotonic()
        shard = self.spec.shards[index]
        key = self.keys.claim(index, phase)
        claim = {"owner": self.owner, "node": self.node, "phase": phase, "index": index, "at": time.time(),
                 "done": False}
        put_json(self.store, key, claim)
        beat = _ClaimHeartbeat(self.store, key, claim, self.heartbeat_s, self.alive)
        beat.start()
        try:
            source = open_source(self.shard_dir / shard.file)
            unit = ShardSpec(index, shard.file, shard.first_index, shard.numel)
            tc = _tensor_codec(self.spec, self.device)
            if phase == "plan":
                text = plan_shard(source, unit, tc, self.spec.seed, on_progress=lambda _: self._check(beat)).to_json()
                self._publishable(beat)
                self.store.put_stream(self.keys.plan(index), text.encode())
            else:
                budget = ShardBudget.from_json(_read_text(self.store, self.keys.budget(index)))
                part = encode_shard(source, budget, tc, self.work_dir / f"part-{index}.nwc",
                                    on_progress=lambda _: self._check(beat))
                self._publishable(beat)
                meta = upload_file(self.store, self.keys.part(index), part.path)
                put_json(self.store, self.keys.part_report(index),
                          {"sha256": meta["sha256"], "size": meta["size"], "tensors": part.reports_json()})
                part.path.unlink()
        except BaseException:
            beat.stop()
            if (get_json(self.store, key) or {}).get("owner") == self.owner:
                self.store.delete(key)  # free the unit at once for the coordinator (or a retry)
            raise
        beat.stop()
        seconds = time.monotonic() - t0
        put_json(self.store, key, {**claim, "at": time.time(), "done": True, "seconds": round(seconds, 3)})
        return seconds

    def _publishable(self, beat: _ClaimHeartbeat) -> None:
        """Last check before writing a result (a finished job's work/ prefix is gone and must stay gone)."""
        self._check(beat)
        if self.alive is not None and not self.alive():
            raise UnitAborted(beat.key)


# ----------------------------------------------------------------------------- helper side (task nwc.shard_unit)


def send_unit(settings: Settings, job_id: str, phase: str, index: int) -> None:
    from worker.celery_app import GPU_QUEUE, SHARD_UNIT
    from worker.dispatch import get_celery

    get_celery(settings).send_task(SHARD_UNIT, args=[job_id, phase, index], queue=GPU_QUEUE, routing_key=GPU_QUEUE)


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _unit_dir(settings: Settings, job_id: str) -> Path:
    """This process's download directory for the job's shards (scratch/units/<pid>/<job>). A process keeps one job's
    shards (between its plan and encode units): starting on another job drops the others, and the directories of
    pool processes that are gone."""
    units = settings.scratch_dir / "units"
    mine = str(os.getpid())
    if units.is_dir():
        for d in units.iterdir():
            if d.name != mine and not _pid_alive(d.name):
                shutil.rmtree(d, ignore_errors=True)
        if (units / mine).is_dir():
            for d in (units / mine).iterdir():
                if d.name != job_id:
                    shutil.rmtree(d, ignore_errors=True)
    (units / mine / job_id).mkdir(parents=True, exist_ok=True)
    return units / mine / job_id


def _fetch_shard(store: ObjectStore, shard: UnitShard, dest: Path) -> Path:
    path = dest / shard.file
    marker = dest / f".{shard.file}.sha256"
    if path.is_file() and path.stat().st_size == shard.size and marker.is_file() and \
            marker.read_text() == shard.sha256:
        return path
    size, sha = download_checked(store, shard.key, path)
    if sha != shard.sha256 or size != shard.size:
        path.unlink(missing_ok=True)
        raise RuntimeError(f"model file {shard.file}: stored bytes do not match its sha256/size")
    marker.write_text(sha)
    return path


def run_shard_unit(job_id: str, phase: str, index: int, settings: Settings) -> str:
    """Task `nwc.shard_unit`: run one unit of a fanned-out job unless it is done, live-claimed, or the job ended."""
    sf = session_factory(settings)

    def job_state() -> JobState | None:
        with sf() as s:
            return s.scalar(select(Job.state).where(Job.id == job_id))

    with sf() as s:
        job = s.get(Job, job_id)
        if job is None:
            return "skipped: no such job"
        tenant_id, state = job.tenant_id, job.state
    if state not in (JobState.QUEUED, JobState.RUNNING):  # a queued job's coordinator is coming back: units count
        return f"skipped: job is {state.value}"
    store = make_store(settings)
    keys = ShardKeys(job_prefix(tenant_id, job_id))
    raw = get_json(store, keys.units)
    if raw is None or phase not in PHASES:
        return "skipped: no such unit"
    spec = FanoutSpec.from_dict(raw)
    if not 0 <= index < len(spec.shards):
        return "skipped: no such unit"
    if store.exists(keys.result(index, phase)):
        return "skipped: done"
    claim = get_json(store, keys.claim(index, phase))
    if claim_is_live(claim, settings.lease_seconds):
        return f"skipped: claimed by {claim['node']}"  # type: ignore[index]
    if phase == "encode" and not store.exists(keys.budget(index)):
        return "skipped: not allocated yet"
    from codec.pipeline import resolve_device

    dest = _unit_dir(settings, job_id)
    path = _fetch_shard(store, spec.shards[index], dest)
    runner = UnitRunner(store, keys, spec, dest, dest, resolve_device(settings.worker_device), node_name(),
                        settings.lease_heartbeat_seconds,
                        alive=lambda: job_state() in (JobState.QUEUED, JobState.RUNNING))
    try:
        seconds = runner.run(phase, index)
    except UnitAborted:
        shutil.rmtree(dest, ignore_errors=True)
        return "stopped: the job ended"
    if phase == "encode":
        path.unlink(missing_ok=True)  # the shard's last use
    return f"ran {phase} unit {index} in {seconds:.1f} s"


# ----------------------------------------------------------------------------- coordinator side


def fanout_spec(ctx: JobContext, source: ModelSource) -> FanoutSpec | None:
    """The job's units if it fans out: model-free nwc, at least `fanout_min_shards` shards (0 = never), every shard a
    model file at the top of the model directory."""
    n_min = ctx.settings.fanout_min_shards
    if ctx.opts.calibrated or ctx.opts.method != "nwc" or n_min == 0 or len(source.shards) < n_min:
        return None
    with session_factory(ctx.settings)() as s:
        files = {f.path: f for f in s.scalars(select(ModelFile).where(ModelFile.model_id == ctx.model_id))}
    from codec.registry import load_codec
    from codec.shards import shard_specs

    shards = []
    for sp in shard_specs(source):
        f = files.get(sp.file)
        if f is None:
            return None
        shards.append(UnitShard(sp.index, sp.file, f.key, f.sha256, f.size, sp.first_index, sp.numel))
    info = load_codec(ctx.opts.codec_id).info
    return FanoutSpec(info.id, info.sha256, ctx.opts.seed, ctx.opts.bits, tuple(shards))


def _run_phase(ctx: JobContext, runner: UnitRunner, phase: str) -> dict[str, int]:
    """Send the phase's missing units, then wait for their results, running free or abandoned units here.
    Returns how many of the phase's units each node ran."""
    store, keys, spec = ctx.store, runner.keys, runner.spec
    n = len(spec.shards)

    def stored() -> set[str]:  # one LIST per poll, not a request per unit
        return {o.key for o in store.list_objects(keys.base)}

    present = stored()
    pending = [i for i in range(n) if keys.result(i, phase) not in present]
    for i in pending:
        send_unit(ctx.settings, ctx.job_id, phase, i)
    lo, hi = _PHASE_RANGE[phase]
    total = max(1, sum(s.numel for s in spec.shards))
    while True:
        ctx.check()
        present = stored()
        pending = [i for i in pending if keys.result(i, phase) not in present]
        done = sum(s.numel for s in spec.shards if s.index not in pending)
        ctx.set_progress(lo + (hi - lo) * done / total)
        if not pending:
            break
        claims = {i: get_json(store, keys.claim(i, phase)) if keys.claim(i, phase) in present else None
                  for i in pending}
        free = [i for i in pending if not claim_is_live(claims[i], ctx.settings.lease_seconds)]
        if not free:
            time.sleep(min(5.0, max(POLL_S, 0.05 * len(pending))))  # staleness is measured in lease_seconds
            continue
        i = free[-1]  # helpers take units in the order they were sent: start from the other end
        before = claims[i]
        if before is not None and before.get("owner") != runner.owner:
            ctx.event("log", f"{phase} unit {i}: claim of {before.get('node')} went stale; running it here",
                      {"phase": phase, "unit": i, "stale_owner": before.get("owner"), "node": runner.node})
        runner.run(phase, i)
    ran: Counter[str] = Counter()
    for i in range(n):
        c = get_json(store, keys.claim(i, phase))
        ran[c["node"] if c and c.get("done") else "earlier attempt"] += 1
    ctx.event("log", f"{phase} units done: {dict(ran)}", {"phase": phase, "units": dict(ran)})
    return dict(ran)


def _allocate(ctx: JobContext, keys: ShardKeys, spec: FanoutSpec, header: Any, n_levels: int) -> None:
    """Budgets from all plans (once: a resumed coordinator keeps the stored ones, which encode units may use)."""
    from codec.shards import ShardPlan, allocate

    n = len(spec.shards)
    if all(ctx.store.exists(keys.budget(i)) for i in range(n)):
        return
    plans = [ShardPlan.from_json(_read_text(ctx.store, keys.plan(i))) for i in range(n)]
    budgets = allocate(plans, spec.bits, header, n_levels)
    for b in budgets.values():
        ctx.store.put_stream(keys.budget(b.index), b.to_json().encode())
    ctx.event("log", f"allocated {sum(b.budget_bytes for b in budgets.values()):.0f} bytes over {n} shards",
              {"level": next(iter(budgets.values())).level,
               "budgets": {b.file: round(b.budget_bytes) for b in budgets.values()}})


def _fetch_parts(ctx: JobContext, runner: UnitRunner) -> list[Any]:
    """Download the encoded shards (checked against their reports); a part overwritten by a racing duplicate that
    does not match its report is encoded again here."""
    from codec.pipeline import TensorReport
    from codec.shards import ShardPart

    parts = []
    for i in range(len(runner.spec.shards)):
        dest = ctx.root / "parts" / f"{i}.nwc"
        for attempt in range(2):
            rep = get_json(ctx.store, runner.keys.part_report(i))
            _, sha = download_checked(ctx.store, runner.keys.part(i), dest, ctx.check)
            if rep is not None and sha == rep["sha256"]:
                break
            if attempt:
                raise RuntimeError(f"shard part {i} does not match its report")
            runner.run("encode", i)
        parts.append(ShardPart(i, dest, [TensorReport(**t) for t in rep["tensors"]]))
    return parts


def compress_fanout(ctx: JobContext, source: ModelSource, spec: FanoutSpec) -> tuple[CompressReport, dict[str, Any]]:
    """The coordinator: plan units → allocation → encode units → merge into ctx.out_dir. Returns the report and a
    summary of the fan-out (units per node and phase) for the stage's event."""
    from codec.pipeline import bundle_header
    from codec.registry import load_codec
    from codec.shards import merge_shards

    t0 = time.time()
    keys = ShardKeys(ctx.prefix)
    stored = get_json(ctx.store, keys.units)
    if stored != spec.to_dict():
        if stored is not None:  # another codec or other files than the stored units were made for: start over
            ctx.store.delete_prefix(keys.base)
        put_json(ctx.store, keys.units, spec.to_dict())
    codec = load_codec(spec.codec_id)
    header = bundle_header(source, codec, spec.bits)
    runner = UnitRunner(ctx.store, keys, spec, ctx.model_dir, ctx.root / "parts-work", ctx.device, node_name(),
                        ctx.settings.lease_heartbeat_seconds, check=ctx.check)
    units = {"plan": _run_phase(ctx, runner, "plan")}
    _allocate(ctx, keys, spec, header, codec.tables.n_levels)
    units["encode"] = _run_phase(ctx, runner, "encode")
    parts = _fetch_parts(ctx, runner)
    ctx.check()
    report = merge_shards(parts, ctx.out_dir, header, source, codec, spec.bits, ctx.device, started=t0)
    shutil.rmtree(ctx.root / "parts", ignore_errors=True)
    ctx.set_progress(1.0)
    workers = sorted({node for counts in units.values() for node in counts} - {"earlier attempt"})
    return report, {"shards": len(spec.shards), "units": units, "workers": workers, "coordinator": runner.node}
