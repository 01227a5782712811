"""The Celery application, built from Settings.

Two queues: ``gpu`` runs jobs and shard units of fanned-out jobs (one at a time per worker process), ``cpu`` runs
light tasks (webhooks, a reaper pass). Settings follow the rules for hour-long GPU jobs (docs/DEPLOY.md): late acks,
prefetch 1, JSON only, soft/hard time limits per attempt, a Redis visibility timeout above the hard limit,
and no torch/CUDA import here (the worker's parent process must never initialize CUDA; the job code
imports torch lazily inside the child that runs it).

The broker is not the source of truth: the job table is. Embedded brokers (kombu's filesystem transport)
have no visibility timeout, so a job whose worker was SIGKILLed is found by the reaper through its expired
lease and re-enqueued (worker/jobs.py). Task results are not stored (``task_ignore_result``): the state of a
job lives in the database.

Importing this module reads no settings and creates nothing: the queue and task names are plain constants, and
the app for `get_settings()` (``app``, what ``celery -A worker.celery_app`` finds) is built on first access.
Code with its own Settings calls `make_celery(settings)` (or `worker.dispatch.get_celery`, cached).

    celery -A worker.celery_app worker -Q gpu,cpu -c 1     (or: nwc worker)
"""

from __future__ import annotations

from pathlib import Path

from celery import Celery
from kombu import Exchange, Queue

from api.core.config import Settings, get_settings

__all__ = ["GPU_QUEUE", "CPU_QUEUE", "RUN_JOB", "SEND_WEBHOOK", "SHARD_UNIT", "make_celery", "broker_folders", "app"]

GPU_QUEUE = "gpu"
CPU_QUEUE = "cpu"
RUN_JOB = "nwc.run_job"
SEND_WEBHOOK = "nwc.send_webhook"
REAP = "nwc.reap"
SHARD_UNIT = "nwc.shard_unit"

# Redis redelivers an unacked message after the visibility timeout: it must exceed the longest attempt,
# else a running job would be handed to a second worker (the lease would stop it, but wastefully).
VISIBILITY_MARGIN_S = 3600


def broker_folders(settings: Settings) -> dict[str, Path]:
    """Folders of the embedded filesystem broker under data_dir (one filesystem, so moves are atomic)."""
    base = settings.data_dir / "broker"
    return {"queue": base / "queue", "processed": base / "processed", "control": base / "control"}


def _broker_options(settings: Settings) -> dict:
    if settings.broker_url.startswith("filesystem://"):
        folders = broker_folders(settings)
        for p in folders.values():
            p.mkdir(parents=True, exist_ok=True)
        q = str(folders["queue"].resolve())
        return {
            "data_folder_in": q,
            "data_folder_out": q,
            "processed_folder": str(folders["processed"].resolve()),
            "control_folder": str(folders["control"].resolve()),
            "store_processed": False,
            "polling_interval": 0.1,
        }
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return {"visibility_timeout": settings.job_time_limit + VISIBILITY_MARGIN_S}
    return {}


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    celery = Celery("nwc", broker=settings.broker_url, include=["worker.tasks"])
    exchange = Exchange("nwc", type="direct")
    celery.conf.update(
        broker_transport_options=_broker_options(settings),
        broker_connection_retry_on_startup=True,
        # Dispatch only: job state is in the database, never in a result backend.
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_queues=(
            Queue(GPU_QUEUE, exchange, routing_key=GPU_QUEUE),
            Queue(CPU_QUEUE, exchange, routing_key=CPU_QUEUE),
        ),
        task_default_queue=CPU_QUEUE,
        task_default_exchange="nwc",
        task_default_routing_key=CPU_QUEUE,
        task_routes={RUN_JOB: {"queue": GPU_QUEUE, "routing_key": GPU_QUEUE},
                     SHARD_UNIT: {"queue": GPU_QUEUE, "routing_key": GPU_QUEUE},
                     SEND_WEBHOOK: {"queue": CPU_QUEUE, "routing_key": CPU_QUEUE},
                     REAP: {"queue": CPU_QUEUE, "routing_key": CPU_QUEUE}},
        # An hour-long job is acknowledged when it ends, not when it starts, and a worker holds one at a time.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.job_soft_time_limit,
        task_time_limit=settings.job_time_limit,
        worker_max_tasks_per_child=settings.worker_max_tasks_per_child or None,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        timezone="UTC",
        enable_utc=True,
    )
    return celery


def __getattr__(name: str) -> Celery:
    """``app``: the Celery app for `get_settings()`, built (and its broker folders created) on first access."""
    if name == "app":
        global app
        app = make_celery()
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
