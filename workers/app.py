"""The worker's Celery app: the shared configuration plus the render task, bound to one runtime per process."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down
from sqlalchemy.exc import SQLAlchemyError

from farm.dispatch.broker import RENDER_TASK, make_celery
from farm.settings import Settings
from farm.store.control import pending_per_pool
from workers.control import ControlLoop
from workers.metrics import METRICS, device_peak, start_metrics_server
from workers.runtime import WorkerRuntime
from workers.tasks import release_held, render_jobs

log = logging.getLogger("farm.worker")
_DB_RETRY_MAX = 30


def create_app(
    settings: Settings,
    *,
    worker_name: str | None = None,
    max_batch: int | None = None,
    io_threads: int = 2,
    low_memory: bool = False,
    metrics_port: int = 0,
    pool: str | None = None,
) -> Celery:
    """A Celery app whose render task builds its runtime (engine, storage, pipelines) on first use.

    metrics_port > 0 serves Prometheus metrics there (workers/metrics.py) from now on.
    """
    if metrics_port:
        start_metrics_server(metrics_port)
    app = make_celery(settings, "farm-worker")
    # One process per device: a solo pool renders one task at a time in the main thread.
    app.conf.update(
        worker_pool="solo",
        worker_concurrency=1,
    )
    runtime: list[WorkerRuntime] = []

    def ensure_runtime() -> WorkerRuntime:
        # Engine, storage, caches and the heartbeat; pipelines still load on their first job, never here.
        if not runtime:
            runtime.append(
                WorkerRuntime.build(
                    settings,
                    app,
                    worker_name,
                    max_batch=max_batch,
                    io_threads=io_threads,
                    low_memory=low_memory,
                    pool=pool,
                )
            )
            METRICS.track_caches(runtime[0].caches.stats)
            METRICS.track_peak(lambda: device_peak(settings))  # for render_mfu, asked at the first render
            METRICS.track_pending(lambda: pending_per_pool(runtime[0].engine))
            # The reaper and dispatcher loop runs in every worker process; one at a time leads.
            runtime[0].control = ControlLoop(runtime[0].engine, app, settings, holder=runtime[0].name).start()
        return runtime[0]

    @worker_ready.connect(weak=False)
    def _register(**_: Any) -> None:
        ensure_runtime()  # `farm workers` lists this worker before its first job

    @app.task(name=RENDER_TASK, bind=True, max_retries=_DB_RETRY_MAX)
    def render(self: Any, job_ids: list[str]) -> dict[str, int]:
        ensure_runtime()
        try:
            outcome = render_jobs(runtime[0], list(job_ids))
            log.info("caches: %s", runtime[0].caches.stats())
            return outcome.as_dict()
        except SQLAlchemyError as exc:
            # The job database is away: the rows still say what is owed, so try the same ids again later.
            delay = min(2**self.request.retries, 60)
            log.warning("database error (%s); task retried in %d s", exc.__class__.__name__, delay)
            raise self.retry(countdown=delay, exc=exc) from None

    @worker_shutting_down.connect(weak=False)
    def _stopping(**_: Any) -> None:
        # SIGTERM (a warm shutdown): the current task renders what fits in the grace period, hands the rest
        # back, and the worker exits; new messages are not claimed any more.
        if runtime and runtime[0].stopping_at is None:
            runtime[0].stopping_at = time.monotonic()
            log.info("shutting down: %.0f s of grace for the work in hand", settings.shutdown_grace_s)

    @worker_shutdown.connect(weak=False)
    def _drain(**_: Any) -> None:
        # The images handed to the upload pool are stored and recorded while the grace period lasts; whatever
        # this worker still holds after that goes back to pending at once, not at lease expiry.
        if runtime:
            rt = runtime[0]
            grace = rt.grace_left()
            rt.uploader.drain(timeout_s=max(grace, 0.0) if grace is not None else None)
            release_held(rt)
            if rt.control is not None:
                rt.control.stop()
            rt.leases.stop()  # after the uploads: their jobs stay this worker's until recorded or released
            log.info("worker stopped: %s; caches: %s", rt.stats, rt.caches.stats())

    return app
