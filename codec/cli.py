"""The `nwc` command line: compress, decompress, inspect, train-codec; worker, serve, db upgrade (service)."""

from __future__ import annotations

import datetime
import platform
import shlex
import sys
from pathlib import Path

import typer

# The service's command groups, mounted only when asked for (main) so the codec commands never import the web
# stack: name -> (module:attribute, what `nwc --help` says of it).
SERVICE_GROUPS = {
    "admin": ("api.admin:admin_app", "tenants, API keys"),
    "remote": ("api.remote:remote_app", "submit, status, download against a running service"),
}
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Neural Weight Compression (NWC).",
                  epilog="Service commands (loaded on use): " + ", ".join(
                      f"nwc {name} --help ({what})" for name, (_, what) in SERVICE_GROUPS.items()) + ".")


@app.callback()
def _root() -> None:
    """Neural Weight Compression: a learned, entropy-coded codec for neural-network weights."""


def _weight_files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise typer.BadParameter(f"{src} holds no .safetensors files")
    return files


@app.command("train-codec")
def train_codec_cmd(
    source: list[Path] = typer.Option(
        None, "--source", help="safetensors files or model dirs (default: all-mpnet-base-v2)"
    ),
    codec_id: str = typer.Option("nwc-w128-d2", "--id", help="id to register the trained codec under"),
    width: int = typer.Option(128),
    depth: int = typer.Option(2),
    steps: int = typer.Option(3000),
    batch: int = typer.Option(4096, help="chunks (16 weights each) per step"),
    lr: float = typer.Option(1e-3),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="cpu, cuda or auto"),
    weights_dir: Path = typer.Option(
        None, help="where to write the checkpoint + registry (default: codec/weights)"
    ),
) -> None:
    """Train the variable-rate codec on real weights, then tabulate and register it."""
    import torch

    from codec.model import CodecConfig
    from codec.registry import WEIGHTS_DIR, export_codec
    from codec.train import TrainConfig, report_json, train_codec

    if not source:
        from codec.assets import mpnet_dir

        source = [mpnet_dir()]
    files = [f for s in source for f in _weight_files(s)]
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    cfg = TrainConfig(steps=steps, batch_chunks=batch, lr=lr, seed=seed, device=dev)
    model, report = train_codec(files, CodecConfig(width=width, depth=depth), cfg)
    training = {
        "command": "nwc " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {dev}",
        "seconds": round(report.seconds, 1),
        "sources": report.sources,
        "steps": steps,
        "batch_chunks": batch,
        "seed": seed,
        "final_val": report.history[-1]["val"] if report.history else {},
    }
    info = export_codec(model, codec_id, training, weights_dir or WEIGHTS_DIR)
    out = (weights_dir or WEIGHTS_DIR) / f"{codec_id}.train.json"
    out.write_text(report_json(report))
    typer.echo(f"registered {info.id} ({info.file}, sha256 {info.sha256[:16]}…) in {report.seconds:.0f} s")


def _fail(e: Exception | str) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def compress(
    src: Path = typer.Argument(..., help="model directory of safetensors shards, or one .safetensors file"),
    out: Path = typer.Option(..., "-o", "--out", help="bundle directory to write"),
    bits: float = typer.Option(None, "--bits", help="target average bits per weight, every byte counted "
                               "(not for the pruning methods nowag-p and wanda)"),
    codec_id: str = typer.Option(None, "--codec", help="registered codec id (default: the registry's default)"),
    device: str = typer.Option("auto", help="cpu, cuda or auto"),
    seed: int = typer.Option(0, help="seed of the rate-curve sampling and of the calibration windows"),
    method: str = typer.Option("nwc", help="nwc (learned codec), gptq or rtn (fixed-length baselines), nowag-vq "
                               "(NoWag vector quantization), nowag-p (NoWag pruning) or wanda (pruning baseline)"),
    sparsity: float = typer.Option(None, help="nowag-p / wanda: fraction of each matrix's weights removed"),
    pattern: str = typer.Option(None, help="nowag-p / wanda: N:M semi-structured pattern, such as 2:4 or 4:8"),
    calib: str = typer.Option(None, "--calib", help="calibration text: 'wiki' (built-in) or a .txt/.jsonl file; "
                              "enables block-by-block Hessian-guided compression (causal LMs)"),
    calib_seqs: int = typer.Option(32, help="calibration sequences"),
    calib_len: int = typer.Option(512, help="tokens per calibration sequence"),
    act_order: bool = typer.Option(False, help="GPTQ: quantize columns by decreasing Hessian diagonal"),
    finetune_epochs: int = typer.Option(0, help="block fine-tuning epochs on the original block outputs (0: off)"),
    allocation: str = typer.Option("none", help="nwc with --calib: rate across layers by measured sensitivity "
                                   "(kl: effect on next-token KL | relative | absolute block-output error) or none"),
    allocation_strength: float = typer.Option(1.0, help="scale of the cross-layer level offsets (0: none)"),
    raw_embeddings: bool = typer.Option(False, "--raw-embeddings",
                                        help="keep the token embedding and lm_head lossless (not coded)"),
    verify: bool = typer.Option(True, help="decode, load, generate and evaluate the result in a fresh process"),
    dense: Path = typer.Option(None, help="decoded dense model directory (default: OUT-dense beside the bundle)"),
    keep_dense: bool = typer.Option(True, "--dense-output/--no-dense-output",
                                    help="write the dense safetensors model that transformers loads"),
    eval_tokens: int = typer.Option(2048, help="held-out tokens for the verification's perplexity and KL"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Compress every tensor of SRC to BITS bits/weight (or prune it): model-free by default, Hessian-guided with
    --calib."""
    from codec.calibrated import METHODS, CalibOptions, CalibratedError, compress_calibrated
    from codec.calibration import CalibrationError
    from codec.container import ContainerError
    from codec.nowag import PRUNE_METHODS, NoWagError
    from codec.nowag_free import compress_data_free
    from codec.pipeline import compress_model, keep_embeddings
    from codec.ratecontrol import RateTargetError
    from codec.source import SourceError

    dense_dir = (dense or out.parent / f"{out.name}-dense") if keep_dense else None
    if dense_dir is not None and dense_dir.exists() and (not dense_dir.is_dir() or any(dense_dir.iterdir())):
        _fail(f"the dense output {dense_dir} exists and is not empty: remove it, pass --dense DIR or "
              "--no-dense-output")
    try:
        if method not in METHODS:
            raise CalibratedError(f"unknown --method {method!r} ({', '.join(METHODS)})")
        if bits is None:
            if method not in PRUNE_METHODS:
                raise CalibratedError(f"--method {method} needs --bits B")
            bits = 0.0  # pruning has no rate target
        elif method in PRUNE_METHODS:
            raise CalibratedError(f"--method {method} prunes: give --sparsity S or --pattern N:M, not --bits")
        opts = CalibOptions(calib or "wiki", calib_seqs, calib_len, seed, act_order=act_order,
                            finetune_epochs=finetune_epochs, allocation=allocation,
                            allocation_strength=allocation_strength, code_embeddings=not raw_embeddings,
                            sparsity=sparsity, pattern=pattern)
        if calib is None and method in ("nowag-vq", "nowag-p"):
            r = compress_data_free(src, out, method, bits, opts, progress=not quiet)
        elif calib is None and method != "nwc":
            raise CalibratedError(f"--method {method} needs calibration data: add --calib wiki (or a text file)")
        elif calib is None:
            r = compress_model(src, out, bits, codec_id=codec_id, device=device, progress=not quiet, seed=seed,
                               include=keep_embeddings if raw_embeddings else None)
        else:
            r = compress_calibrated(src, out, bits, method, opts, codec_id, device, not quiet, seed)
    except (SourceError, RateTargetError, ContainerError, LookupError, CalibratedError, CalibrationError,
            NoWagError) as e:
        _fail(e)
    if verify:
        from dataclasses import asdict

        from codec.pipeline import REPORT_FILE
        from codec.verify import verify_in_fresh_process

        original = src if src.is_dir() else None
        v = verify_in_fresh_process(out, original, dense_dir, eval_tokens,
                                    device="cpu" if device == "auto" else device)
        r.verification = asdict(v)
        (out / REPORT_FILE).write_text(r.to_json())
        typer.echo(v.summary(), err=not v.ok)
        if not v.ok:
            raise typer.Exit(3)
    elif dense_dir is not None:
        from codec.pipeline import decompress_model

        decompress_model(out, dense_dir, device=device, progress=not quiet)
    if dense_dir is not None:
        typer.echo(f"dense model (transformers loads it): {dense_dir}")
    coded = [t for t in r.tensors if t.nmse is not None]
    mean_nmse = sum(t.nmse * t.rows for t in coded) / max(sum(t.rows for t in coded), 1)
    typer.echo(
        f"{out}: {r.file_bytes / 1e6:.2f} MB, {r.measured_bits:.3f} bits/weight "
        f"({f'target {bits:g}' if method not in PRUNE_METHODS else opts.prune_spec.label}) over "
        f"{r.total_params:,} params; mean normalized MSE {mean_nmse:.3e}; {r.seconds:.0f} s on {r.device}, "
        f"peak RSS {r.peak_rss_mb:.0f} MB"
    )


@app.command()
def decompress(
    bundle: Path = typer.Argument(..., help="bundle directory (or .nwc file) written by `nwc compress`"),
    out: Path = typer.Option(..., "-o", "--out", help="dense model directory to write"),
    device: str = typer.Option("auto", help="cpu, cuda or auto"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Decode a bundle into a dense safetensors model directory that transformers loads."""
    from codec.container import ContainerError
    from codec.pipeline import decompress_model

    try:
        path = decompress_model(bundle, out, device=device, progress=not quiet)
    except (ContainerError, ValueError, LookupError, FileExistsError) as e:
        _fail(e)
    typer.echo(f"wrote {path}")


@app.command()
def inspect(
    bundle: Path = typer.Argument(..., help="bundle directory or .nwc file"),
    verify: bool = typer.Option(False, help="read every tensor and check its checksum"),
) -> None:
    """Table of tensors: method, shape, bytes, bits/weight, error (from report.json) and checksum."""
    import json

    from codec.container import ContainerError, ContainerReader
    from codec.pipeline import REPORT_FILE, bundle_file

    report_path = Path(bundle) / REPORT_FILE
    errors = {}
    if report_path.exists():
        errors = {t["name"]: t["nmse"] for t in json.loads(report_path.read_text())["tensors"]}
    try:
        with ContainerReader(bundle_file(bundle)) as r:
            h = r.header
            n = sum(e.numel for e in r.entries)
            typer.echo(f"codec {h.codec_id or '-'} (sha256 {h.codec_sha256[:16]}), created by {h.created_by}")
            typer.echo(f"{len(r.entries)} tensors, {n:,} params, {r.file_size:,} bytes, "
                       f"{8 * r.file_size / max(n, 1):.4f} bits/weight (whole file)")
            typer.echo(f"{'name':<56} {'method':<6} {'shape':<16} {'bytes':>11} {'bpw':>7} {'nmse':>9}  sha256")
            for e in r.entries:
                err = errors.get(e.name)
                typer.echo(
                    f"{e.name:<56} {e.method:<6} {'x'.join(map(str, e.shape)):<16} {e.nbytes:>11,} "
                    f"{8 * e.nbytes / max(e.numel, 1):>7.3f} {'' if err is None else f'{err:.2e}':>9}  {e.sha256[:12]}"
                )
            if verify:
                bad = r.verify()
                if bad:
                    _fail(ContainerError(f"corrupt tensors: {', '.join(bad)}"))
                typer.echo("all checksums verified")
    except ContainerError as e:
        _fail(e)


@app.command("eval")
def eval_cmd(
    original: Path = typer.Argument(..., help="original model directory"),
    compressed: Path = typer.Argument(..., help="compressed model: a dense directory or a bundle (decoded first)"),
    max_tokens: int = typer.Option(16384, help="evaluation tokens (held-out Wikipedia text)"),
    window: int = typer.Option(2048, help="context window (capped at the model's)"),
    device: str = typer.Option("auto"),
    json_out: Path = typer.Option(None, "--json", help="also write the report as JSON here"),
) -> None:
    """Perplexity of both models, KL divergence and top-1 agreement on held-out text, greedy generations."""
    import json
    import tempfile

    from codec.assets import eval_text
    from codec.evaluate import evaluate_pair
    from codec.pipeline import BUNDLE_FILE, decompress_model, resolve_device

    dev = resolve_device(device)
    with tempfile.TemporaryDirectory(prefix="nwc-eval-") as tmp:
        dense = compressed
        if (compressed / BUNDLE_FILE).exists():
            dense = decompress_model(compressed, Path(tmp) / "dense", device=dev, progress=False)
        try:
            rep = evaluate_pair(original, dense, eval_text(), max_tokens=max_tokens, window=window, device=dev,
                                text_name="held-out Wikipedia articles (last 20 %, codec.assets.eval_text)")
        except ValueError as e:
            _fail(e)
    typer.echo(rep.format())
    if json_out:
        json_out.write_text(json.dumps(rep.to_dict(), indent=1))


@app.command()
def codecs() -> None:
    """List the registered codecs."""
    from codec.registry import list_codecs, read_registry

    default = read_registry()["default"]
    for c in list_codecs():
        mark = "*" if c.id == default else " "
        typer.echo(f"{mark} {c.id}  {c.file}  sha256 {c.sha256[:16]}  {c.config}  trained: {c.training.get('command')}")


# ----------------------------------------------------------------------------- service (thin wrappers)
# The service lives in api/ and worker/; these commands import it lazily so that `nwc compress` never loads
# web packages (and the worker's parent process never imports torch).

db_app = typer.Typer(no_args_is_help=True, help="The service database.")
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Apply database migrations (NWC_DATABASE_URL; default: SQLite under NWC_DATA_DIR)."""
    from api.core.config import get_settings
    from api.db.migrate import upgrade

    url = get_settings().db_url
    upgrade(url, revision)
    typer.echo(f"database at {revision}: {_redact(url)}")


def _redact(url: str) -> str:
    from sqlalchemy import make_url

    return make_url(url).render_as_string(hide_password=True)


@app.command()
def worker(
    queues: str = typer.Option("gpu,cpu", help="comma-separated queues: gpu (jobs), cpu (webhooks, light tasks)"),
    concurrency: int = typer.Option(1, help="jobs run at once (one per GPU is the rule)"),
    hostname: str = typer.Option("nwc@%h", "--hostname", "-n", help="Celery node name (%h: host name)"),
    device: str = typer.Option(None, help="cpu | cuda | auto (default: NWC_WORKER_DEVICE, auto = CUDA if present)"),
    loglevel: str = typer.Option("info", help="log level"),
    pool: str = typer.Option("prefork", help="Celery pool (prefork: jobs run in a child; the parent never "
                             "initializes CUDA)"),
) -> None:
    """Start a worker: runs jobs from the queue (Celery; settings from NWC_* variables, docs/DEPLOY.md)."""
    import os
    import shutil

    if device:
        os.environ["NWC_WORKER_DEVICE"] = device
    from api.core.config import get_settings

    get_settings.cache_clear()
    settings = get_settings()
    from api.db.session import sqlite_path

    if sqlite_path(settings.db_url) is not None:  # embedded: bring the SQLite file to the schema (idempotent)
        import time

        from api.db.migrate import upgrade

        try:
            upgrade(settings.db_url)
        except Exception:  # another process migrating at the same moment: its result is as good
            time.sleep(1.0)
            upgrade(settings.db_url)
    # Detect a GPU without importing torch here (the parent must not initialize CUDA); jobs pick it via auto.
    gpu = Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None
    typer.echo(f"nwc worker: queues {queues}, concurrency {concurrency}, device {settings.worker_device}"
               f"{' (a GPU is present: jobs use CUDA)' if gpu and settings.worker_device == 'auto' else ''}",
               err=True)
    from worker.celery_app import make_celery

    make_celery(settings).worker_main(["worker", "-Q", queues, "-c", str(concurrency), "-n", hostname, "--pool", pool,
                            "--loglevel", loglevel, "--without-gossip", "--without-mingle"])


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="port"),
    worker_: bool = typer.Option(True, "--worker/--no-worker", help="also run a local worker (embedded mode)"),
    grace: float = typer.Option(10.0, help="seconds the local worker gets to stop before it is killed"),
) -> None:
    """Embedded service: migrate the database, start a local worker, serve the API and dashboard.

    Defaults need nothing installed: SQLite, a local object directory and kombu's filesystem broker under
    NWC_DATA_DIR. A job interrupted by stopping `serve` resumes from its checkpoints after a restart."""
    import os
    import signal
    import subprocess

    from api.core.config import get_settings
    from api.db.migrate import upgrade

    # Presigned download and part-upload URLs of the local store point under NWC_PUBLIC_URL: by default, where
    # this process listens (a wildcard address is reached as 127.0.0.1), so `--port` alone keeps them working.
    if "NWC_PUBLIC_URL" not in os.environ:
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else (f"[{host}]" if ":" in host else host)
        os.environ["NWC_PUBLIC_URL"] = f"http://{shown}:{port}"
        get_settings.cache_clear()
    settings = get_settings()
    upgrade(settings.db_url)
    _bootstrap_key(settings)
    proc = None
    if worker_:
        env = {**os.environ, "NWC_DATA_DIR": str(settings.data_dir)}
        proc = subprocess.Popen([sys.executable, "-m", "codec.cli", "worker", "--queues", "gpu,cpu",
                                 "--concurrency", "1", "--hostname", "nwc-local@%h"],
                                env=env, start_new_session=True)
    typer.echo(f"nwc serve: http://{host}:{port} (data in {settings.data_dir}"
               f"{', local worker pid ' + str(proc.pid) if proc else ''})", err=True)

    def _stop(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        import uvicorn

        uvicorn.run("api.main:app", host=host, port=port)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc is not None:
            _stop_group(proc, grace)


def _bootstrap_key(settings) -> None:
    """Embedded mode (SQLite): a fresh database gets tenant "local" and an API key in DATA_DIR/local-api-key, so
    the dashboard and `nwc remote` work at once. Production databases get keys from `nwc admin create-key`."""
    if not settings.db_url.startswith("sqlite"):
        return
    from api.admin import bootstrap_local_key
    from api.db.session import make_engine, make_session_factory, session_scope

    key_file = settings.data_dir / "local-api-key"
    engine = make_engine(settings.db_url, null_pool=True)
    try:
        with session_scope(make_session_factory(engine)) as db:
            token = bootstrap_local_key(db, key_file)
    finally:
        engine.dispose()
    if token:
        typer.echo(f"nwc serve: created tenant 'local' and its API key (also in {key_file}):\n  {token}", err=True)
    elif key_file.exists():
        typer.echo(f"nwc serve: the local API key is in {key_file}", err=True)


def _stop_group(proc, grace: float) -> None:
    """SIGTERM the worker's process group (a warm shutdown), SIGKILL it after `grace` seconds. A job killed
    here keeps its lease until it expires; the next worker's reaper then requeues it and it resumes."""
    import os
    import signal
    import subprocess

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # children of the worker (prefork pool) left in the group
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def service_group(name: str) -> typer.Typer:
    """The Typer app of service command group `name` (a key of SERVICE_GROUPS), imported on use."""
    import importlib

    module, attr = SERVICE_GROUPS[name][0].split(":")
    return getattr(importlib.import_module(module), attr)


def main() -> None:
    """Entry point of `nwc`. The service's command groups (`nwc admin …`, `nwc remote …`) are mounted only when
    asked for, so the codec commands never import the web stack."""
    if len(sys.argv) > 1 and sys.argv[1] in SERVICE_GROUPS:
        app.add_typer(service_group(sys.argv[1]), name=sys.argv[1])
    app()


if __name__ == "__main__":
    main()
