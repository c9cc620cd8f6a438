"""The worker's Celery app: the shared configuration plus the render task, bound to one runtime per process."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown
from sqlalchemy.exc import SQLAlchemyError

from farm.dispatch.broker import REAP_TASK, RENDER_TASK, make_celery
from farm.settings import Settings
from workers.metrics import METRICS, start_metrics_server
from workers.runtime import WorkerRuntime
from workers.tasks import render_jobs

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
        # Run by the one worker started with --beat: hand out again the jobs of workers that died.
        beat_schedule={"reap": {"task": REAP_TASK, "schedule": max(10.0, settings.lease_s / 2)}},
        beat_schedule_filename=str(settings.home / "celerybeat-schedule"),
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

    @app.task(name=REAP_TASK, ignore_result=True)
    def reap() -> dict[str, int]:
        from farm.dispatch.publish import reap_and_dispatch
        from farm.store.engine import make_engine

        engine = runtime[0].engine if runtime else make_engine(settings.database_url)
        reaped, sent = reap_and_dispatch(engine, app, settings)
        if reaped.requeued or reaped.failed:
            log.warning("reaper: %d expired jobs sent again, %d failed", len(reaped.requeued), len(reaped.failed))
        return {"requeued": len(reaped.requeued), "failed": len(reaped.failed), "dispatched": sent.jobs}

    @worker_shutdown.connect(weak=False)
    def _drain(**_: Any) -> None:
        # A warm shutdown finishes the current task; the images it handed to the upload pool are
        # stored and recorded before the process exits.
        if runtime:
            rt = runtime[0]
            rt.uploader.close()
            rt.leases.stop()  # after the uploads: their jobs stay this worker's until recorded
            log.info("worker stopped: %s; caches: %s", rt.stats, rt.caches.stats())

    return app
