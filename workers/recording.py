"""Recording what happened to rendered jobs: one transaction per batch, retries re-published with backoff."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy.exc import OperationalError as SQLOperationalError

from farm.dispatch.broker import RENDER_TASK
from farm.job import Claimed
from farm.storage import StoredObject
from farm.store import transitions
from farm.store.schema import JobStatus

if TYPE_CHECKING:
    from workers.runtime import WorkerRuntime

log = logging.getLogger("farm.worker")
_DB_TRIES = 5


def record_batch(
    rt: WorkerRuntime,
    done: Sequence[tuple[Claimed, StoredObject, int]],
    failed: Sequence[tuple[Claimed, BaseException]],
) -> None:
    """Mark a batch's confirmed uploads succeeded and its failures retried or failed, in one transaction.

    A dropped database connection is retried here (the pool reconnects); if it stays away, the jobs keep
    their lease, which expires, and the reaper hands them out again (their objects are overwritten).
    """
    for attempt in range(1, _DB_TRIES + 1):
        try:
            with rt.engine.begin() as conn:
                marked = transitions.mark_succeeded_many(
                    conn, [(job.id, stored, ms) for job, stored, ms in done], worker=rt.name
                )
                outcomes = [
                    (
                        job,
                        exc,
                        transitions.mark_attempt_failed(
                            conn, job.id, worker=rt.name, error=_describe(exc), max_attempts=rt.settings.max_attempts
                        ),
                    )
                    for job, exc in failed
                ]
            break
        except SQLOperationalError as exc:
            if attempt == _DB_TRIES:
                log.error(
                    "could not record %d results (%s); their leases will expire and they will be redone",
                    len(done) + len(failed),
                    exc.__class__.__name__,
                )
                return
            time.sleep(min(2**attempt, 30))
    for job, stored, render_ms in done:
        if job.id in marked:
            rt.stats.succeeded += 1
            log.info("job %s succeeded (render %d ms) -> %s", job.id, render_ms, stored.uri)
        else:
            rt.stats.lost += 1
            log.warning(
                "job %s was canceled or reaped while rendering; its object %s will be overwritten by the "
                "next attempt, if any",
                job.id,
                stored.uri,
            )
    for job, error, state in outcomes:
        _after_failure(rt, job, error, state)


def _describe(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {exc}"


def _after_failure(rt: WorkerRuntime, job: Claimed, exc: BaseException, state: JobStatus | None) -> None:
    settings = rt.settings
    if state is None:
        rt.stats.lost += 1
        return
    if state is JobStatus.FAILED:
        rt.stats.failed += 1
        log.error("job %s failed after %d attempts: %s", job.id, job.attempts, _describe(exc))
        return
    rt.stats.retried += 1
    delay = min(settings.retry_backoff_s * 2 ** (job.attempts - 1), settings.retry_backoff_max_s)
    log.warning("job %s attempt %d failed (%s); retrying in %d s", job.id, job.attempts, _describe(exc), delay)
    try:
        rt.app.send_task(RENDER_TASK, args=[[job.id]], queue=settings.queue, countdown=delay)
    except (KombuOperationalError, OSError):
        # The broker is away: back to pending, so `farm dispatch` (or `farm reap`) sends it again.
        with rt.engine.begin() as conn:
            transitions.mark_pending(conn, [job.id])
        log.error("job %s could not be re-queued (broker unreachable); left pending for `farm dispatch`", job.id)
