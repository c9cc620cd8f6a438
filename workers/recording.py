"""Recording what happened to rendered jobs: one fenced transaction per batch; retries re-published with backoff.

Every write names the attempt (worker incarnation and claim_seq), so a late or duplicate attempt changes
nothing. An attempt that is no longer the job's (canceled, reaped, claimed again) deletes the object it stored:
nothing of it stays. Results that cannot be recorded now are kept and retried by the heartbeat until recorded,
or given up a lease later (their leases then expire and the reaper hands the jobs out again).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy import select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError as SQLOperationalError

from farm.dispatch.broker import RENDER_TASK
from farm.errors import FarmError
from farm.job import Claimed, Scores
from farm.secrets import scrub
from farm.storage import StoredObject
from farm.store import transitions
from farm.store.schema import Dataset, Job, JobStatus, utcnow
from workers.metrics import METRICS

if TYPE_CHECKING:
    from workers.runtime import WorkerRuntime

log = logging.getLogger("farm.worker")

Done = Sequence[tuple[Claimed, StoredObject, int, str | None, Scores | None]]  # job, object, render ms, recipe JSON
Failed = Sequence[tuple[Claimed, BaseException]]


@dataclass
class Unrecorded:
    """Results whose transaction failed, kept in memory (their jobs stay held) until recorded or given up."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    batches: list[tuple[float, Done, Failed]] = field(default_factory=list)

    def add(self, done: Done, failed: Failed) -> None:
        with self.lock:
            self.batches.append((time.monotonic(), done, failed))

    def take(self) -> list[tuple[float, Done, Failed]]:
        with self.lock:
            taken, self.batches = self.batches, []
            return taken

    def __len__(self) -> int:
        with self.lock:
            return sum(len(done) + len(failed) for _at, done, failed in self.batches)


def record_batch(rt: WorkerRuntime, done: Done, failed: Failed, *, since: float | None = None) -> bool:
    """Mark a batch's confirmed uploads succeeded and its failures retried or failed, in one fenced transaction.

    Returns whether it was recorded. When the database refuses (any error: a dropped connection, a bug), the
    batch is kept for the heartbeat to retry; ``since`` is when it first failed.
    """
    rejected: list[str] = []  # images the verdicts rejected with keep-rejected no: deleted once committed
    try:
        with rt.engine.begin() as conn:
            marked = transitions.mark_succeeded_many(
                conn,
                [(job.id, job.claim_seq, stored, ms) for job, stored, ms, *_rest in done],
                worker=rt.name,
                recipes={job.id: recipe for job, _stored, _ms, recipe, _scores in done if recipe is not None},
                scores={job.id: scores for job, _stored, _ms, _recipe, scores in done if scores is not None},
                deletes=rejected,
            )
            outcomes = [(job, exc, _fail(rt, conn, job, exc, rejected)) for job, exc in failed]
    except Exception as exc:
        count = len(done) + len(failed)
        if isinstance(exc, SQLOperationalError):
            log.warning("could not record %d results (%s); retrying with the next heartbeat", count, _describe(exc))
        else:
            log.exception("could not record %d results; retrying with the next heartbeat", count)
        _keep(rt, done, failed, since)
        return False
    for uri in rejected:
        _delete_uri(rt, uri)
    for job, stored, render_ms, *_rest in done:
        if job.id in marked:
            rt.stats.succeeded += 1
            rt.event("recorded", job.id, job.claim_seq)
            log.info("job %s succeeded (render %d ms) -> %s", job.id, render_ms, stored.uri)
        else:
            rt.stats.lost += 1
            rt.event("canceled", job.id, job.claim_seq)
            _delete(rt, stored)
    rt.holdings.drop([job.id for job, *_result in done])
    for job, error, state in outcomes:
        _after_failure(rt, job, error, state)
    rt.holdings.drop([job.id for job, _exc in failed])
    return True


def record_stored(rt: WorkerRuntime, done: Done, failed: Failed) -> None:
    """The upload pool's callback: a stored batch (or a group of them, Settings.record_group_s), recorded."""
    METRICS.count_errors("upload", len(failed))
    record_batch(rt, done, failed)


def retry_unrecorded(rt: WorkerRuntime) -> None:
    """Record what could not be recorded before; give up on results unrecordable for a whole lease."""
    for since, done, failed in rt.unrecorded.take():
        if time.monotonic() - since < rt.settings.lease_s:
            record_batch(rt, done, failed, since=since)
            continue
        log.error(
            "giving up on %d results unrecorded for %d s; their leases expire and the jobs are rendered again",
            len(done) + len(failed),
            rt.settings.lease_s,
        )
        for job, stored, *_result in done:
            rt.event("released", job.id, job.claim_seq)
            _delete(rt, stored)
        rt.holdings.drop([job.id for job, *_result in done] + [job.id for job, _exc in failed])


def _keep(rt: WorkerRuntime, done: Done, failed: Failed, since: float | None) -> None:
    if since is None:
        rt.unrecorded.add(done, failed)
    else:
        with rt.unrecorded.lock:
            rt.unrecorded.batches.append((since, done, failed))


def _fail(
    rt: WorkerRuntime, conn: Connection, job: Claimed, exc: BaseException, rejected: list[str]
) -> JobStatus | None:
    delay = _delay_s(rt, job)
    return transitions.mark_attempt_failed(
        conn,
        job.id,
        worker=rt.name,
        seq=job.claim_seq,
        error=scrub(_describe(exc), rt.settings),  # job errors are shown by status, jobs and exports
        max_attempts=rt.settings.max_attempts,
        retry_at=utcnow() + timedelta(seconds=delay),
        deletes=rejected,
    )


def _delay_s(rt: WorkerRuntime, job: Claimed) -> int:
    settings = rt.settings
    return min(settings.retry_backoff_s * 2 ** (job.attempts - 1), settings.retry_backoff_max_s)


def _delete(rt: WorkerRuntime, stored: StoredObject) -> None:
    """Remove the object of an attempt that is not the job's: its key is attempt-scoped, so no winner is hurt."""
    try:
        rt.storage.delete(stored.key)
    except FarmError as exc:
        log.warning("could not delete %s (%s); `farm gc` removes it", stored.uri, exc)


def _delete_uri(rt: WorkerRuntime, uri: str) -> None:
    """Remove a rejected image its row no longer names (keep-rejected no); `farm gc` removes it if this fails."""
    try:
        rt.storage.delete(rt.storage.key_for_uri(uri))
    except (FarmError, ValueError) as exc:
        log.warning("could not delete rejected image %s (%s); `farm gc` removes it", uri, exc)


def _describe(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {exc}"


def _after_failure(rt: WorkerRuntime, job: Claimed, exc: BaseException, state: JobStatus | None) -> None:
    if state is None:
        rt.stats.lost += 1
        rt.event("canceled", job.id, job.claim_seq)
        return
    if state is JobStatus.FAILED:
        rt.stats.failed += 1
        rt.event("recorded", job.id, job.claim_seq)
        log.error("job %s failed after %d attempts: %s", job.id, job.attempts, _describe(exc))
        return
    rt.stats.retried += 1
    rt.event("recorded", job.id, job.claim_seq)
    delay = _delay_s(rt, job)
    log.warning("job %s attempt %d failed (%s); retrying in %d s", job.id, job.attempts, _describe(exc), delay)
    with rt.engine.connect() as conn:
        row = conn.execute(
            select(Job.queue, Dataset.priority).join(Dataset, Dataset.id == Job.dataset_id).where(Job.id == job.id)
        ).first()
    queue = (row.queue if row is not None else None) or rt.settings.queue
    priority = int(row.priority) if row is not None else 0
    with contextlib.suppress(KombuOperationalError, OSError):
        # Its dataset's priority, on the queue it came from; if the broker is away, the control loop sends the
        # job again once the retry time has passed (it is queued, with that time as its send time).
        rt.app.send_task(RENDER_TASK, args=[[job.id]], queue=queue, countdown=delay, priority=9 - priority)
