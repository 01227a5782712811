"""Celery tasks. Light module: the worker's parent process imports it, so nothing here imports torch.

    nwc.run_job(job_id)       gpu queue: run or resume a job (worker/jobs.py)
    nwc.shard_unit(job_id, phase, index)  gpu queue: one shard unit of a fanned-out job (worker/fanout.py)
    nwc.send_webhook(job_id)  cpu queue: deliver a terminal job's signed webhook (worker/webhooks.py)
    nwc.reap()                cpu queue: one reaper pass (each worker also runs one in a thread)

The reaper thread is started by the `worker_ready` signal, in the parent process only.
"""

from __future__ import annotations

import logging

from celery import shared_task
from celery.signals import worker_ready, worker_shutdown

from api.core.config import get_settings
from worker.celery_app import REAP, RUN_JOB, SEND_WEBHOOK, SHARD_UNIT

__all__ = ["run_job_task", "shard_unit_task", "send_webhook_task", "reap_task"]

log = logging.getLogger(__name__)

_reaper = None


@shared_task(name=RUN_JOB, acks_late=True, ignore_result=True)
def run_job_task(job_id: str) -> str:
    from worker.jobs import run_job

    outcome = run_job(job_id, get_settings())
    log.info("job %s: %s", job_id, outcome)
    return outcome


@shared_task(name=SHARD_UNIT, acks_late=True, ignore_result=True)
def shard_unit_task(job_id: str, phase: str, index: int) -> str:
    from worker.fanout import run_shard_unit

    outcome = run_shard_unit(job_id, phase, index, get_settings())
    log.info("job %s %s unit %d: %s", job_id, phase, index, outcome)
    return outcome


@shared_task(name=SEND_WEBHOOK, acks_late=True, ignore_result=True, soft_time_limit=600, time_limit=660)
def send_webhook_task(job_id: str) -> None:
    from worker.webhooks import send_job_webhook

    send_job_webhook(job_id, get_settings())


@shared_task(name=REAP, ignore_result=True, soft_time_limit=120, time_limit=180)
def reap_task() -> dict:
    from worker.reaper import reap

    return reap(get_settings())


@worker_ready.connect
def _start_reaper(**_: object) -> None:
    global _reaper
    from worker.reaper import ReaperThread

    _reaper = ReaperThread(get_settings())
    _reaper.start()


@worker_shutdown.connect
def _stop_reaper(**_: object) -> None:
    if _reaper is not None:
        _reaper.stop()
