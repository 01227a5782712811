"""`nwc remote …`: submit, follow and download jobs on an NWC service (api.client underneath).

`remote_app` is a typer app; codec/cli.py mounts it with `app.add_typer(remote_app, name="remote")`.
The service is NWC_API_URL / NWC_API_KEY, or --url / --api-key.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from api.client import ApiError, ChecksumError, NWCClient
from api.schemas.jobs import JobDetail, JobTuning

__all__ = ["remote_app"]

remote_app = typer.Typer(help="Use a remote NWC service: submit jobs, follow them, download results.",
                         no_args_is_help=True)
_conn: dict[str, str | None] = {}


@remote_app.callback()
def _options(
    url: str = typer.Option(None, "--url", envvar="NWC_API_URL", help="service base URL"),
    api_key: str = typer.Option(None, "--api-key", envvar="NWC_API_KEY", help="API key (nwc_…)"),
) -> None:
    _conn["url"], _conn["key"] = url, api_key


def _client() -> NWCClient:
    try:
        return NWCClient(_conn.get("url"), _conn.get("key"))
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def _fail(e: Exception) -> typer.Exit:
    if isinstance(e, ApiError):
        rid = f" (request id {e.request_id})" if e.request_id else ""
        typer.echo(f"error: {e.status} {e.code}: {e.message}{rid}", err=True)
    else:
        typer.echo(f"error: {e}", err=True)
    return typer.Exit(1)


def _line(job: JobDetail) -> str:
    eta = f", eta {job.eta_seconds:.0f} s" if job.eta_seconds is not None else ""
    stage = f" [{job.stage}]" if job.stage else ""
    return f"{job.id} {job.state}{stage} {100 * job.progress:.1f}%{eta}"


@remote_app.command()
def submit(
    source: str = typer.Argument(..., help="a local model directory (uploaded), or a Hugging Face model id"),
    bits: float = typer.Option(None, "--bits", help="target bits per weight (not for nowag-p and wanda)"),
    method: str = typer.Option("nwc", help="nwc, gptq, rtn, nowag-vq, nowag-p or wanda"),
    sparsity: float = typer.Option(None, help="nowag-p / wanda: fraction of weights removed"),
    pattern: str = typer.Option(None, help="nowag-p / wanda: N:M pattern such as 2:4"),
    calib: str = typer.Option(None, "--calib", help="'wiki', 'none', a .txt/.jsonl file (uploaded) or a cal_… id"),
    output: list[str] = typer.Option(None, "--output", help="bundle, dense, report, plots (repeatable)"),
    revision: str = typer.Option("main", help="Hub revision (model ids only)"),
    hub_token: str = typer.Option(None, "--hub-token", envvar="HF_TOKEN", help="Hugging Face token (gated models)"),
    name: str = typer.Option(None, help="model label"),
    webhook: str = typer.Option(None, help="URL that receives a POST when the job ends"),
    idempotency_key: str = typer.Option(None, help="repeat-safe submission key"),
    calib_seqs: int = typer.Option(None, "--calib-seqs", help="calibration sequences"),
    calib_len: int = typer.Option(None, "--calib-len", help="tokens per calibration sequence"),
    finetune_epochs: int = typer.Option(None, "--finetune-epochs", help="calibrated nwc: block fine-tuning epochs"),
    allocation: str = typer.Option(None, "--allocation", help="calibrated nwc: none, kl, relative or absolute"),
    eval_tokens: int = typer.Option(None, "--eval-tokens", help="held-out tokens of the verification"),
    wait: bool = typer.Option(False, "--wait", help="follow the job until it ends"),
    download: Path = typer.Option(None, "--download", help="with --wait: download the artifacts here"),
) -> None:
    """Bring the model (upload or Hub import), create the job, print its id on stdout."""
    with _client() as nwc:
        try:
            path = Path(source)
            if path.is_dir():
                model = nwc.upload_model_dir(
                    path, name, on_file=lambda rel, size: typer.echo(f"uploading {rel} ({size:,} bytes)", err=True))
                model_id = model.id
            else:
                m = nwc.import_model(source, revision, token=hub_token, name=name)
                typer.echo(f"importing {source}@{revision} as {m.id}", err=True)
                done = nwc.wait_model(m.id)
                if done.state != "ready":
                    raise RuntimeError(f"import failed: {done.error}")
                model_id = m.id
            if calib and Path(calib).is_file():
                calib = nwc.upload_calibration(calib).id
            given = {"calib_seqs": calib_seqs, "calib_len": calib_len, "finetune_epochs": finetune_epochs,
                     "allocation": allocation, "eval_tokens": eval_tokens, "sparsity": sparsity, "pattern": pattern}
            tuning = JobTuning(**{k: v for k, v in given.items() if v is not None})
            job = nwc.submit_job(model_id, bits, method=method, calibration=calib, outputs=output or None,
                                 webhook_url=webhook, idempotency_key=idempotency_key, tuning=tuning)
            typer.echo(job.id)
            if wait:
                job = nwc.wait_job(job.id, on_update=lambda j: typer.echo(_line(j), err=True))
                if job.state != "succeeded":
                    typer.echo(f"job {job.state}: {job.error}", err=True)
                    raise typer.Exit(3)
                if download is not None:
                    for p in nwc.download_artifacts(job.id, download):
                        typer.echo(f"downloaded {p}", err=True)
        except (ApiError, ChecksumError, ValueError, RuntimeError, OSError) as e:
            raise _fail(e) from None


@remote_app.command()
def status(
    job_id: str,
    as_json: bool = typer.Option(False, "--json", help="the whole job as JSON"),
    wait: bool = typer.Option(False, "--wait", help="follow until the job ends"),
) -> None:
    """State, stage, progress and ETA of a job (exit 0 when succeeded or still running, 3 when it failed)."""
    with _client() as nwc:
        try:
            job = nwc.wait_job(job_id, on_update=lambda j: typer.echo(_line(j), err=True)) if wait \
                else nwc.get_job(job_id)
        except ApiError as e:
            raise _fail(e) from None
    if as_json:
        sys.stdout.write(json.dumps(job.model_dump(mode="json"), indent=2) + "\n")
    else:
        typer.echo(_line(job))
        for st in job.stages:
            p = "" if st.progress is None else f" {100 * st.progress:.0f}%"
            d = "" if st.duration_s is None else f" {st.duration_s:.1f} s"
            typer.echo(f"  {st.name:<10} {st.state}{p}{d}")
        if job.error:
            typer.echo(f"  error: {job.error}")
    if job.state in ("failed", "cancelled"):
        raise typer.Exit(3)


@remote_app.command("download")
def download_cmd(
    job_id: str,
    out: Path = typer.Option(..., "-o", "--out", help="directory to write the artifacts into"),
    kind: list[str] = typer.Option(None, "--kind", help="bundle, dense, report, plot (repeatable; default all)"),
) -> None:
    """Download a job's artifacts (sha256-checked), keeping their names (bundle/…, dense/…, report.json)."""
    with _client() as nwc:
        try:
            paths = nwc.download_artifacts(job_id, out, kinds=kind or None,
                                           on_file=lambda a: typer.echo(f"{a.name} ({a.size:,} bytes)", err=True))
        except (ApiError, ChecksumError, ValueError, OSError) as e:
            raise _fail(e) from None
    for p in paths:
        typer.echo(str(p))
