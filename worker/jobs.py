"""The job runner: fetch → plan → compress → verify → publish, each stage idempotent.

`run_job(job_id)` is what the Celery task `nwc.run_job` does. It claims the job (worker/lease.py), holds the
lease with a heartbeat thread, and runs the stages. Each stage records a JobEvent and updates Job.stage,
Job.progress and Job.eta_at; everything a later attempt needs is in the object store under the job's prefix,
never only on the local disk, so a redelivered job resumes on any worker:

    tenants/<tenant>/jobs/<job>/work/checkpoints/...   mirror of OUT/.nwc-work (calibrated: per-block checkpoints)
    tenants/<tenant>/jobs/<job>/work/shards/...        model-free fan-out per shard (worker/fanout.py)
    tenants/<tenant>/jobs/<job>/work/state/compress.json   compress finished: bundle manifest + report
    tenants/<tenant>/jobs/<job>/work/state/verify.json     verify finished: verification + dense manifest
    tenants/<tenant>/jobs/<job>/bundle/<file>          the bundle directory (model.nwc, config, tokenizer, ...)
    tenants/<tenant>/jobs/<job>/dense/<file>           the decoded dense model (if "dense" in outputs)
    tenants/<tenant>/jobs/<job>/report.json            compression report + verification

A stage whose state file exists is skipped (a skipped compression downloads the bundle again, for verify);
compression restores the stored checkpoints into OUT/.nwc-work before it starts, and uploads each new
checkpoint as the codec reports it (on_checkpoint), so a worker SIGKILLed mid-job loses at most the unit it
was working on, and the resumed run writes a byte-identical bundle.

Nothing here imports torch at module level: the Celery parent process imports this module (through
worker.tasks) and must not initialize CUDA; the codec is imported inside the stages, in the child process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import delete, select

from api.core.config import Settings, get_settings
from api.db.models import Artifact, ArtifactKind, Job, JobEvent, JobState, Model, ModelFile, ModelState
from api.db.session import session_scope
from api.db.types import utcnow
from api.services.keys import job_prefix
from api.storage import ObjectNotFound, ObjectStore, make_store
from api.storage.base import CHUNK
from worker.db import session_factory
from worker.dispatch import enqueue_job, notify_job
from worker.lease import Claim, JobCancelled, Lease, LeaseLost, claim_job, worker_identity
from worker.options import InvalidJobOptions, JobOptions

__all__ = ["run_job", "JobFailed", "STAGES", "STAGE_WEIGHTS"]

log = logging.getLogger(__name__)

STAGES = ("fetch", "plan", "compress", "verify", "publish")
# Share of the job's progress bar per stage: estimates, not measurements (on the 3-block test model of
# tests/test_worker.py verification takes longer than compression; compression is expected to dominate on
# full-size models).
STAGE_WEIGHTS = {"fetch": 0.05, "plan": 0.02, "compress": 0.70, "verify": 0.18, "publish": 0.05}
# Within compression, the codec's own phases (codec.progress.Progress.stage).
_COMPRESS_PHASES = {"plan": (0.0, 0.3), "allocate": (0.3, 0.45), "compress": (0.45, 1.0)}
_MODEL_FREE_PHASES = {"plan": (0.0, 0.4), "compress": (0.4, 1.0)}
REPORT_FILE = "report.json"
WORK_DIR_NAME = ".nwc-work"


class JobFailed(Exception):
    """A permanent failure: the job fails now, without another attempt."""


def _safe_name(name: str) -> str:
    """A directory name from a model name (the codec records the source directory's name in the bundle header,
    so it must not depend on the worker: two runs of the same job write the same bytes)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", name.rsplit("/", 1)[-1]).strip(".-")
    return s or "model"


def _rel_path(p: str) -> PurePosixPath:
    rel = PurePosixPath(p)
    if rel.is_absolute() or not rel.parts or any(x in ("", ".", "..") for x in rel.parts) or "\\" in p:
        raise JobFailed(f"invalid model file path {p!r}")
    return rel


def download_checked(store: ObjectStore, key: str, dest: Path, check: Callable[[], None] | None = None,
              on_bytes: Callable[[int], None] | None = None) -> tuple[int, str]:
    """Stream an object to `dest` (atomically: a .partial file renamed at the end); returns (size, sha256)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    h = hashlib.sha256()
    size = 0
    src = store.open(key)
    try:
        with open(tmp, "wb") as f:
            while chunk := src.read(CHUNK):
                f.write(chunk)
                h.update(chunk)
                size += len(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
                if check is not None:
                    check()
    finally:
        src.close()
    tmp.replace(dest)
    return size, h.hexdigest()


def upload_file(store: ObjectStore, key: str, path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        r = store.put_stream(key, f)
    return {"key": r.key, "size": r.size, "sha256": r.sha256}


def put_json(store: ObjectStore, key: str, obj: Any) -> None:
    store.put_stream(key, json.dumps(obj, indent=1, sort_keys=True).encode())


def get_json(store: ObjectStore, key: str) -> Any | None:
    try:
        f = store.open(key)
    except ObjectNotFound:
        return None
    try:
        return json.loads(f.read())
    finally:
        f.close()


@dataclass
class JobContext:
    settings: Settings
    store: ObjectStore
    claim: Claim
    lease: Lease
    job_id: str
    tenant_id: str
    model_id: str
    model_name: str
    opts: JobOptions
    prefix: str
    root: Path  # local scratch of this job
    t0: float = field(default_factory=time.monotonic)
    progress: float = 0.0
    stage: str = ""
    started_progress: float = 0.0
    calib_path: Path | None = None
    device: str = "cpu"

    @property
    def model_dir(self) -> Path:
        return self.root / "src" / _safe_name(self.model_name)

    @property
    def out_dir(self) -> Path:
        return self.root / "out" / "bundle"

    @property
    def dense_dir(self) -> Path:
        return self.root / "out" / "dense"

    def key(self, rel: str) -> str:
        return self.prefix + rel

    # -- progress

    def set_progress(self, within_stage: float) -> None:
        """Progress inside the current stage (0..1) → the job's overall progress and ETA (monotonic)."""
        before = sum(STAGE_WEIGHTS[s] for s in STAGES[: STAGES.index(self.stage)])
        p = min(1.0, before + STAGE_WEIGHTS[self.stage] * max(0.0, min(1.0, within_stage)))
        if p > self.progress:
            self.progress = p
        eta = None
        gained = self.progress - self.started_progress
        if gained >= 0.02:
            elapsed = time.monotonic() - self.t0
            # never in the past: a stage whose progress is estimated (verify) may run longer than its share
            eta = utcnow() + timedelta(seconds=max(1.0, elapsed * (1.0 - self.progress) / gained))
        self.lease.set_progress(stage=self.stage, progress=round(self.progress, 4), eta_at=eta)

    def check(self) -> None:
        self.lease.check()

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None, **row: Any) -> None:
        """Write an event (and optionally job fields) while the job is still ours."""
        sf = session_factory(self.settings)
        with session_scope(sf) as s:
            owned = self.lease.write(s, **row)
            if owned:
                s.add(JobEvent(job_id=self.job_id, stage=self.stage or None, kind=kind, message=message,
                               data=data or {}))
        self.check()


# ----------------------------------------------------------------------------- stages


def stage_fetch(ctx: JobContext) -> None:
    """Download the model's files (checked against their sha256) and an uploaded calibration text."""
    sf = session_factory(ctx.settings)
    with sf() as s:
        files = [(f.path, f.key, f.size, f.sha256) for f in
                 s.scalars(select(ModelFile).where(ModelFile.model_id == ctx.model_id).order_by(ModelFile.path))]
    if not files:
        raise JobFailed("the model has no files")
    total = max(1, sum(f[2] for f in files))
    done = 0
    marker = ctx.root / "src" / ".fetched.json"
    fetched = json.loads(marker.read_text()) if marker.exists() else {}

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        ctx.set_progress(done / total)

    for path, key, size, sha in files:
        dest = ctx.model_dir / _rel_path(path)
        if fetched.get(path) == sha and dest.is_file() and dest.stat().st_size == size:
            done += size  # this worker already has it (an earlier attempt here)
            continue
        try:
            got_size, got_sha = download_checked(ctx.store, key, dest, ctx.check, on_bytes)
        except ObjectNotFound:
            raise JobFailed(f"model file {path} is missing from the object store") from None
        if got_sha != sha or got_size != size:
            dest.unlink(missing_ok=True)
            raise JobFailed(f"model file {path}: stored bytes do not match its sha256/size")
        fetched[path] = sha
        marker.write_text(json.dumps(fetched))
    if ctx.opts.calibration == "store":
        key = ctx.opts.calibration_key
        assert key is not None
        ctx.calib_path = ctx.root / "calib" / PurePosixPath(key).name
        try:
            download_checked(ctx.store, key, ctx.calib_path, ctx.check)
        except ObjectNotFound:
            raise JobFailed(f"calibration text {key} is not in the object store") from None
    ctx.event("stage", "fetched", {"files": len(files), "bytes": total})


def stage_plan(ctx: JobContext) -> dict[str, Any]:
    """Check that this model can be compressed this way and record the plan (sizes, device, method)."""
    from codec.pipeline import resolve_device
    from codec.source import SourceError, open_source

    try:
        source = open_source(ctx.model_dir)
    except SourceError as e:
        raise JobFailed(f"not a usable safetensors model: {e}") from None
    cfg_file = ctx.model_dir / "config.json"
    archs = json.loads(cfg_file.read_text()).get("architectures") or [] if cfg_file.exists() else []
    if ctx.opts.calibrated and not any(a.endswith("ForCausalLM") for a in archs):
        raise JobFailed("calibrated compression needs a causal language model (config.json architectures "
                        f"*ForCausalLM); this model has {archs or 'no config.json'}; use calibration none")
    ctx.device = resolve_device(ctx.settings.worker_device)
    plan = {"params": source.total_params, "method": ctx.opts.method, "bits": ctx.opts.bits,
            "calibration": ctx.opts.calibration, "device": ctx.device, "architectures": archs,
            # pruning has no rate: its size follows from the sparsity and the source dtype (docs/NOWAG.md)
            "estimated_bundle_bytes": None if ctx.opts.bits is None else int(source.total_params * ctx.opts.bits / 8),
            "options": ctx.opts.to_dict()}
    ctx.set_progress(1.0)
    ctx.event("stage", "planned", plan)
    return plan


class _CheckpointMirror:
    """Uploads new or changed files of OUT/.nwc-work after each checkpoint (state.json last, so the stored state
    never names a container that is not stored yet)."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.prefix = ctx.key("work/checkpoints/")
        self.sent: dict[str, tuple[int, int]] = {}

    def restore(self, work: Path) -> int:
        """Download the stored checkpoints into `work` (emptied first: the store is the truth)."""
        shutil.rmtree(work, ignore_errors=True)
        n = 0
        for obj in self.ctx.store.list_objects(self.prefix):
            rel = _rel_path(obj.key[len(self.prefix):])
            dest = work / rel
            download_checked(self.ctx.store, obj.key, dest)
            st = dest.stat()
            self.sent[str(rel)] = (st.st_size, st.st_mtime_ns)
            n += 1
        return n

    def __call__(self, work: Path) -> None:
        work = Path(work)
        files = sorted(p for p in work.rglob("*") if p.is_file() and not p.name.endswith((".tmp", ".partial")))
        files.sort(key=lambda p: p.name == "state.json")
        uploaded = []
        for p in files:
            rel = p.relative_to(work).as_posix()
            st = p.stat()
            if self.sent.get(rel) == (st.st_size, st.st_mtime_ns):
                continue
            upload_file(self.ctx.store, self.prefix + rel, p)
            self.sent[rel] = (st.st_size, st.st_mtime_ns)
            uploaded.append(rel)
        if uploaded:
            done = []
            state = work / "state.json"
            if state.exists():
                done = sorted(json.loads(state.read_text()).get("done", {}))
            self.ctx.event("checkpoint", f"checkpoint stored ({len(done)} units done)",
                           {"units": done, "files": uploaded})


def stage_compress(ctx: JobContext) -> dict[str, Any]:
    """Compress into OUT (resuming from stored checkpoints); upload the bundle files; write state/compress.json."""
    state_key = ctx.key("work/state/compress.json")
    done = get_json(ctx.store, state_key)
    if done is not None:
        _download_manifest(ctx, done["files"], ctx.out_dir)
        ctx.event("stage", "compressed (earlier attempt)", {"files": len(done["files"])})
        return done

    from codec.calibrated import CalibOptions, compress_calibrated
    from codec.pipeline import compress_model

    shutil.rmtree(ctx.out_dir, ignore_errors=True)
    ctx.out_dir.mkdir(parents=True)
    o = ctx.opts
    fanout: dict[str, Any] | None = None
    phases = _COMPRESS_PHASES if o.calibrated else _MODEL_FREE_PHASES

    def on_progress(p: Any) -> None:
        lo, hi = phases.get(p.stage, (0.0, 1.0))
        ctx.set_progress(lo + (hi - lo) * (p.done / p.total if p.total else 1.0))
        ctx.check()  # cancellation point: the exception stops the codec (it lets callback errors propagate)

    if o.calibrated:
        mirror = _CheckpointMirror(ctx)
        restored = mirror.restore(ctx.out_dir / WORK_DIR_NAME)
        if restored:
            ctx.event("log", f"resuming from {restored} stored checkpoint files", {"files": restored})
        calib_source = "wiki" if o.calibration == "wiki" else str(ctx.calib_path)
        extra: dict[str, Any] = {}
        if o.allocation is not None:
            extra["allocation"] = o.allocation
        if o.allocation_strength is not None:
            extra["allocation_strength"] = o.allocation_strength
        copts = CalibOptions(calib_source, o.calib_seqs, o.calib_len, o.seed, act_order=o.act_order,
                             finetune_epochs=o.finetune_epochs, sparsity=o.sparsity, pattern=o.pattern, **extra)
        report = compress_calibrated(ctx.model_dir, ctx.out_dir, o.bits or 0.0, o.method, copts, o.codec_id,
                                     ctx.device, False, o.seed, on_progress=on_progress, on_checkpoint=mirror)
    elif o.method != "nwc":  # data-free NoWag: diag(H) = 1
        from codec.nowag_free import compress_data_free

        copts = CalibOptions(seed=o.seed, sparsity=o.sparsity, pattern=o.pattern)
        report = compress_data_free(ctx.model_dir, ctx.out_dir, o.method, o.bits or 0.0, copts, progress=False,
                                    on_progress=on_progress)
    else:
        from codec.source import open_source
        from worker.fanout import compress_fanout, fanout_spec

        source = open_source(ctx.model_dir)
        spec = fanout_spec(ctx, source)
        if spec is not None:  # one unit per shard and phase, on any worker (worker/fanout.py)
            report, fanout = compress_fanout(ctx, source, spec)
        else:
            report = compress_model(ctx.model_dir, ctx.out_dir, o.bits, codec_id=o.codec_id, device=ctx.device,
                                    progress=False, seed=o.seed, on_progress=on_progress)
    ctx.check()
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(ctx.out_dir.rglob("*")):
        rel = p.relative_to(ctx.out_dir).as_posix()
        if p.is_file() and not rel.startswith(WORK_DIR_NAME) and rel != REPORT_FILE:
            files[rel] = upload_file(ctx.store, ctx.key(f"bundle/{rel}"), p)
            ctx.check()
    done = {"files": files, "report": json.loads(report.to_json())}
    put_json(ctx.store, state_key, done)
    ctx.store.delete_prefix(ctx.key("work/checkpoints/"))
    ctx.event("stage", "compressed", {"measured_bits": report.measured_bits, "file_bytes": report.file_bytes,
                                      "seconds": report.seconds, **({"fanout": fanout} if fanout else {})})
    return done


def _download_manifest(ctx: JobContext, files: dict[str, dict[str, Any]], dest: Path) -> None:
    for rel, meta in files.items():
        p = dest / _rel_path(rel)
        if p.is_file() and p.stat().st_size == meta["size"]:
            with open(p, "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() == meta["sha256"]:
                    continue
        size, sha = download_checked(ctx.store, meta["key"], p, ctx.check)
        if sha != meta["sha256"]:
            raise RuntimeError(f"stored {meta['key']} does not match its manifest")


def stage_verify(ctx: JobContext, compressed: dict[str, Any]) -> dict[str, Any]:
    """Decode, load, generate and evaluate in a fresh process (codec.verify); the job fails if that fails.
    Uploads the dense model and the final report."""
    state_key = ctx.key("work/state/verify.json")
    done = get_json(ctx.store, state_key)
    if done is not None:
        ctx.event("stage", "verified (earlier attempt)", {})
        return done
    want_dense = "dense" in ctx.opts.outputs
    shutil.rmtree(ctx.dense_dir, ignore_errors=True)
    ctx.dense_dir.parent.mkdir(parents=True, exist_ok=True)
    ctx.set_progress(0.05)
    from dataclasses import asdict

    from codec.verify import verify_in_fresh_process

    def poll(elapsed: float) -> None:  # a cancellation or a lost lease stops the verifier within a heartbeat
        ctx.check()
        ctx.set_progress(min(0.8, 0.05 + elapsed / 600))

    rep = asdict(verify_in_fresh_process(ctx.out_dir, ctx.model_dir, ctx.dense_dir if want_dense else None,
                                         ctx.opts.eval_tokens, ctx.device, timeout=ctx.settings.job_time_limit,
                                         poll=poll))
    if not rep["ok"]:
        raise JobFailed(f"verification failed at {rep['stage']}: {rep['error']}")
    ctx.set_progress(0.85)
    dense: dict[str, dict[str, Any]] = {}
    if want_dense and ctx.dense_dir.is_dir():
        for p in sorted(ctx.dense_dir.rglob("*")):
            if p.is_file():
                rel = p.relative_to(ctx.dense_dir).as_posix()
                dense[rel] = upload_file(ctx.store, ctx.key(f"dense/{rel}"), p)
                ctx.check()
    report = dict(compressed["report"])
    report["verification"] = rep
    report["job"] = {"id": ctx.job_id, "method": ctx.opts.method, "target_bits": ctx.opts.bits,
                     "options": ctx.opts.to_dict()}
    body = json.dumps(report, indent=1).encode()
    r = ctx.store.put_stream(ctx.key(REPORT_FILE), body)
    done = {"verification": rep, "dense": dense,
            "report": {"key": r.key, "size": r.size, "sha256": r.sha256}}
    put_json(ctx.store, state_key, done)
    summary = {k: rep.get(k) for k in ("ok", "stage", "seconds", "generation")}
    if rep.get("evaluation"):
        e = rep["evaluation"]
        summary.update(kl=e.get("kl"), top1_agreement=e.get("top1_agreement"))
    ctx.event("stage", "verified", summary)
    return done


def stage_publish(ctx: JobContext, compressed: dict[str, Any], verified: dict[str, Any]) -> None:
    """Artifact rows for the wanted outputs and state succeeded, in one transaction (only while we own the job)."""
    rows: list[tuple[ArtifactKind, str, dict[str, Any]]] = []
    if "bundle" in ctx.opts.outputs:
        rows += [(ArtifactKind.BUNDLE, f"bundle/{rel}", m) for rel, m in compressed["files"].items()]
    if "dense" in ctx.opts.outputs:
        rows += [(ArtifactKind.DENSE, f"dense/{rel}", m) for rel, m in verified["dense"].items()]
    if "report" in ctx.opts.outputs:
        rows.append((ArtifactKind.REPORT, REPORT_FILE, verified["report"]))
    ctx.set_progress(0.5)
    sf = session_factory(ctx.settings)
    t = utcnow()
    with session_scope(sf) as s:
        owned = ctx.lease.write(s, state=JobState.SUCCEEDED, stage="publish", progress=1.0, eta_at=None,
                                finished_at=t, lease_owner=None, lease_expires_at=None, error=None)
        if not owned:
            s.rollback()
            ctx.check()
            raise LeaseLost(ctx.job_id)
        s.execute(delete(Artifact).where(Artifact.job_id == ctx.job_id))
        for kind, name, m in rows:
            s.add(Artifact(tenant_id=ctx.tenant_id, job_id=ctx.job_id, kind=kind, name=name, key=m["key"],
                           size=m["size"], sha256=m["sha256"]))
        s.add(JobEvent(job_id=ctx.job_id, stage="publish", kind="state", message="succeeded",
                       data={"state": "succeeded", "artifacts": len(rows)}))


# ----------------------------------------------------------------------------- the runner


def run_job(job_id: str, settings: Settings | None = None) -> str:
    """Run (or resume) one job to a terminal state, or back to the queue after a transient failure; returns what
    happened (for logs)."""
    settings = settings or get_settings()
    sf = session_factory(settings)
    owner = worker_identity()
    claim: Claim | str = "no such job"
    for _ in range(20):  # the API commits before enqueueing; a short wait covers replication-lag style races
        claim = claim_job(sf, job_id, owner, settings.lease_seconds, settings.job_max_attempts)
        if claim != "no such job":
            break
        time.sleep(0.25)
    if isinstance(claim, str):
        log.info("job %s not run: %s", job_id, claim)
        if claim.startswith("failed"):
            notify_job(job_id, settings=settings)
        return f"skipped: {claim}"

    with sf() as s:
        job = s.get(Job, job_id)
        assert job is not None
        model = s.get(Model, job.model_id)
        tenant_id, model_id, method, bits, options = job.tenant_id, job.model_id, job.method, job.target_bits, \
            dict(job.options or {})
        model_name = model.name if model is not None else "model"
        model_state = model.state if model is not None else None

    root = settings.scratch_dir / job_id
    with Lease(sf, claim, settings.lease_seconds, settings.lease_heartbeat_seconds) as lease:
        ctx = None
        try:
            if model_state != ModelState.READY:
                raise JobFailed(f"model {model_id} is not ready ({model_state})")
            try:
                opts = JobOptions.parse(method, bits, options, tenant_id)
            except InvalidJobOptions as e:
                raise JobFailed(str(e)) from None
            ctx = JobContext(settings, make_store(settings), claim, lease, job_id, tenant_id, model_id, model_name,
                             opts, job_prefix(tenant_id, job_id), root, progress=claim.progress,
                             started_progress=claim.progress)
            _run_stages(ctx)
            outcome = "succeeded"
        except JobCancelled:
            log.info("job %s cancelled", job_id)
            lease.release()
            _delete_stored(settings, tenant_id, job_id, "")  # nothing was published
            outcome = "cancelled"
        except LeaseLost:
            log.warning("job %s: lease lost to another worker; stopping without touching it", job_id)
            outcome = "lease lost"
        except BaseException as e:  # noqa: BLE001 - every failure is recorded before the task ends
            # (a worker shutdown is re-raised: the scratch then stays for the next attempt on this machine)
            outcome = _fail_or_retry(settings, lease, job_id, tenant_id, e)
    shutil.rmtree(root, ignore_errors=True)
    if outcome == "succeeded":
        # Drop what no artifact refers to: the work area, and the bundle files if the bundle was not asked for.
        assert ctx is not None
        _delete_stored(settings, tenant_id, job_id, "work/", *(() if "bundle" in ctx.opts.outputs else ("bundle/",)))
        notify_job(job_id, settings=settings)
    return outcome


def _delete_stored(settings: Settings, tenant_id: str, job_id: str, *parts: str) -> None:
    """Best effort: delete these parts of the job's stored prefix ("" = all of it); a later sweep can remove
    what is left after an error."""
    try:
        store = make_store(settings)
        for part in parts:
            store.delete_prefix(job_prefix(tenant_id, job_id) + part)
    except Exception:
        log.exception("could not delete the stored work of job %s", job_id)


def _run_stages(ctx: JobContext) -> None:
    ctx.root.mkdir(parents=True, exist_ok=True)
    for name in STAGES:
        ctx.stage = name
        ctx.event("stage", f"{name} started", {"attempt": ctx.claim.attempt}, stage=name)
        if name == "fetch":
            stage_fetch(ctx)
        elif name == "plan":
            stage_plan(ctx)
        elif name == "compress":
            compressed = stage_compress(ctx)
        elif name == "verify":
            verified = stage_verify(ctx, compressed)
        else:
            stage_publish(ctx, compressed, verified)


def _is_permanent(e: BaseException) -> bool:
    if isinstance(e, JobFailed | InvalidJobOptions):
        return True
    from celery.exceptions import SoftTimeLimitExceeded

    if isinstance(e, SoftTimeLimitExceeded):
        return True
    # The codec's refusals (bad model, unreachable rate, bad calibration) do not get better on retry.
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"SourceError", "RateTargetError", "CalibratedError", "CalibrationError", "ContainerError",
                         "LookupError", "ValueError", "MemoryError"})


def _fail_or_retry(settings: Settings, lease: Lease, job_id: str, tenant_id: str, e: BaseException) -> str:
    if isinstance(e, KeyboardInterrupt | SystemExit):  # the worker is shutting down: leave it to the reaper
        raise e
    msg = f"{type(e).__name__}: {e}" if not isinstance(e, JobFailed) else str(e)
    permanent = _is_permanent(e) or lease.claim.attempt >= settings.job_max_attempts
    log.exception("job %s attempt %d failed (%s)", job_id, lease.claim.attempt,
                  "permanent" if permanent else "will retry", exc_info=e)
    sf = session_factory(settings)
    t = utcnow()
    with session_scope(sf) as s:
        if permanent:
            values: dict[str, Any] = dict(state=JobState.FAILED, error=msg[:4000], finished_at=t, eta_at=None,
                                          lease_owner=None, lease_expires_at=None)
        else:
            values = dict(state=JobState.QUEUED, error=msg[:4000], eta_at=None, lease_owner=None,
                          lease_expires_at=None)
        owned = lease.write(s, **values)
        if owned:
            s.add(JobEvent(job_id=job_id, stage=None, kind="error" if permanent else "retry",
                           message=msg[:4000], data={"state": values["state"].value, "attempt": lease.claim.attempt}))
    if not owned:  # cancelled meanwhile (its stored work goes, as after JobCancelled), or taken over
        if lease.cancelled.is_set():
            _delete_stored(settings, tenant_id, job_id, "")
            return "cancelled"
        return "lease lost"
    if permanent:
        _delete_stored(settings, tenant_id, job_id, "")  # nothing was published
        notify_job(job_id, settings=settings)
        return f"failed: {msg}"
    countdown = min(300.0, 5.0 * 2 ** (lease.claim.attempt - 1))
    enqueue_job(job_id, settings=settings, countdown=countdown)
    return f"retry: {msg}"
