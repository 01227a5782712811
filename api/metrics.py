"""Prometheus metrics of one app (its own registry, so several apps in one process do not clash).

* nwc_http_requests_total{method,route,status}, nwc_http_request_duration_seconds{method,route}
* nwc_jobs{state}: jobs by state, counted in the database at scrape time
* nwc_queue_depth{queue}: messages waiting in the broker's queues (absent when the broker cannot be asked)
* nwc_job_stage_duration_seconds{stage}: how long stages took, fed from JobEvents: at each scrape the
  events written since the last one are read in id order and a stage is observed when the job moves
  to another stage or ends. `observe_stage` is the hook for code that times stages itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import func, select

from api.db.models import TERMINAL_JOB_STATES, Job, JobEvent, JobState
from api.services.health import queue_depth

if TYPE_CHECKING:
    from api.deps import Resources

__all__ = ["ApiMetrics", "CONTENT_TYPE"]

log = logging.getLogger("nwc.api.metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TERMINAL = {str(s) for s in TERMINAL_JOB_STATES}
_SCAN_BATCH = 20_000


class _DbCollector:
    def __init__(self, metrics: ApiMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        res = self.metrics.resources
        jobs = GaugeMetricFamily("nwc_jobs", "Jobs by state", labels=["state"])
        try:
            with res.session_factory() as db:
                counts = dict(db.execute(select(Job.state, func.count()).group_by(Job.state)).all())  # type: ignore
                self.metrics.scan_events(db)
            for state in JobState:
                jobs.add_metric([str(state)], float(counts.get(state, 0)))
            yield jobs
        except Exception as e:
            log.warning("metrics: database unavailable: %s", e)
        depth = queue_depth(res.settings)
        if depth is not None:
            g = GaugeMetricFamily("nwc_queue_depth", "Messages waiting in the broker, per queue", labels=["queue"])
            for name, n in sorted(depth.items()):
                g.add_metric([name], float(n))
            yield g


class ApiMetrics:
    def __init__(self, resources: Resources) -> None:
        self.resources = resources
        self.registry = CollectorRegistry(auto_describe=False)
        # Registered first: its scan feeds the stage histogram before that one is collected.
        self.registry.register(_DbCollector(self))
        self.requests = Counter("nwc_http_requests_total", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram(
            "nwc_http_request_duration_seconds", "HTTP request duration", ["method", "route"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.stages = Histogram(
            "nwc_job_stage_duration_seconds", "Duration of job stages", ["stage"], registry=self.registry,
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200),
        )
        self._lock = threading.Lock()
        self._last_event_id = 0
        self._open: dict[str, tuple[str, datetime | None]] = {}  # job id -> (stage, started at; None once ended)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stages.labels(stage).observe(max(seconds, 0.0))

    def scan_events(self, db: Any) -> None:
        with self._lock:
            while True:
                rows = db.execute(
                    select(JobEvent.id, JobEvent.job_id, JobEvent.stage, JobEvent.kind, JobEvent.data,
                           JobEvent.created_at)
                    .where(JobEvent.id > self._last_event_id)
                    .order_by(JobEvent.id)
                    .limit(_SCAN_BATCH)
                ).all()
                for ev_id, job_id, stage, kind, data, at in rows:
                    self._last_event_id = ev_id
                    cur = self._open.get(job_id)
                    if stage is not None and (cur is None or cur[0] != stage):
                        if cur is not None and cur[1] is not None:
                            self.observe_stage(cur[0], (at - cur[1]).total_seconds())
                        cur = (stage, at)
                        self._open[job_id] = cur
                    data = data if isinstance(data, dict) else {}
                    ends_stage = data.get("status") in ("finished", "done") and stage is not None
                    ends_job = kind == "state" and data.get("state") in _TERMINAL
                    if cur is not None and cur[1] is not None and (ends_stage or ends_job):
                        self.observe_stage(cur[0], (at - cur[1]).total_seconds())
                        self._open[job_id] = (cur[0], None)  # closed; later events of this stage do not reopen it
                    if ends_job:
                        self._open.pop(job_id, None)
                if len(rows) < _SCAN_BATCH:
                    return

    def render(self) -> bytes:
        return generate_latest(self.registry)
