"""Dispatch: publish pending jobs to the broker as tasks of compatible jobs, then mark them queued."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy import select
from sqlalchemy.engine import Engine

from farm.dispatch.broker import RENDER_TASK
from farm.dispatch.routing import Needs, Router
from farm.errors import BrokerUnavailable
from farm.job import RENDER_GROUP_FIELDS
from farm.secrets import redact
from farm.settings import Settings
from farm.store import transitions
from farm.store.schema import Dataset, Job, JobStatus

log = logging.getLogger(__name__)
_PAGE = 10_000

# A pending row: its id, then its render group (farm/job.py's RENDER_GROUP_FIELDS, as JobSpec.render_group).
PendingRow = tuple[Any, ...]


@dataclass(frozen=True)
class Dispatched:
    """What one dispatch sent."""

    jobs: int
    tasks: int
    unroutable: int = 0  # left pending: no live pool serves them (the reason is on each job)

    def describe(self, seconds: float) -> str:
        """One line for the CLI."""
        line = f"dispatched {self.jobs} jobs in {self.tasks} tasks in {seconds:.2f} s"
        if self.unroutable:
            line += f"; {self.unroutable} jobs unroutable (no live pool serves them; see `farm status`)"
        return line


def dispatch_pending(
    engine: Engine, app: Celery, settings: Settings, *, dataset_id: int | None = None, router: Router | None = None
) -> Dispatched:
    """Publish every pending job (of one dataset, or all), page by page, each group to its pool's queue.

    Publish first, mark queued after: a worker may claim a job that is still pending, and a crash in
    between leaves jobs pending, which the next dispatch sends again (the guarded claim drops the repeat).
    Jobs no live pool can serve stay pending with the reason recorded (farm/dispatch/routing.py).
    """
    router = router or Router.load(engine, settings)
    sent_jobs = sent_tasks = unroutable = 0
    # Higher-priority datasets first, then page by page in id order within each priority.
    levels = _pending_priorities(engine, dataset_id)
    after, level = "", levels.pop(0) if levels else None
    while level is not None:
        page = _pending_page(engine, dataset_id, after, level)
        if not page:
            after, level = "", levels.pop(0) if levels else None
            continue
        after = page[-1][0]
        published: list[str] = []
        stranded: dict[str, list[str]] = {}
        try:
            with app.producer_or_acquire() as producer:
                for key, job_ids in group_jobs(page, settings.batch_size):
                    group = dict(zip(RENDER_GROUP_FIELDS, key, strict=True))
                    needs = Needs(
                        group["model"], group["controlnet"], group["width"] * group["height"], group["quantize"]
                    )
                    route = router.route(needs)
                    if route.queue is None:
                        stranded.setdefault(route.reason or "unroutable", []).extend(job_ids)
                        continue
                    _publish(app, producer, app.amqp.queues[route.queue], job_ids, level)
                    published.extend(job_ids)
                    sent_tasks += 1
        except (KombuOperationalError, OSError) as exc:
            _mark(engine, published, stranded)
            raise BrokerUnavailable(
                f"broker {redact(settings.broker_url)} unreachable ({exc.__class__.__name__}); "
                f"{sent_jobs + len(published)} jobs sent before it failed"
            ) from exc
        _mark(engine, published, stranded)
        sent_jobs += len(published)
        unroutable += sum(len(ids) for ids in stranded.values())
    if sent_jobs or unroutable:
        log.info("dispatched %d jobs in %d tasks; %d unroutable", sent_jobs, sent_tasks, unroutable)
    return Dispatched(sent_jobs, sent_tasks, unroutable)


def _publish(app: Celery, producer: Any, queue: Any, job_ids: list[str], priority: int) -> None:
    # The lower-level half of send_task: the same message, without per-call routing and signal work,
    # which is most of the cost when publishing tens of thousands of tasks.
    # argsrepr given: Celery would otherwise build a safe repr of every id list (a third of the cost).
    message = app.amqp.create_task_message(
        uuid.uuid4().hex, RENDER_TASK, [job_ids], {}, argsrepr=f"[{len(job_ids)} job ids]", kwargsrepr="{}"
    )
    # kombu's Redis transport serves message priority 0 first; ours is "higher first", so invert it.
    app.amqp.send_task_message(producer, RENDER_TASK, message, queue=queue, retry=False, priority=9 - priority)


def reap_and_dispatch(engine: Engine, app: Celery, settings: Settings) -> tuple[transitions.Reaped, Dispatched]:
    """The reaper (`farm reap`, and the beat task of `farm worker --beat`): expired leases back to pending,
    or failed after the last attempt, then every pending job published."""
    with engine.begin() as conn:
        reaped = transitions.reap_expired(conn, max_attempts=settings.max_attempts)
    return reaped, dispatch_pending(engine, app, settings)


def group_jobs(rows: Iterable[PendingRow], batch_size: int) -> Iterable[tuple[PendingRow, list[str]]]:
    """Group pending rows into lists of at most batch_size ids that can share one pipeline call."""
    groups: dict[PendingRow, list[str]] = {}
    for job_id, *key_fields in rows:
        key = tuple(key_fields)
        bucket = groups.setdefault(key, [])
        bucket.append(job_id)
        if len(bucket) == batch_size:
            yield key, bucket
            groups[key] = []
    for key, bucket in groups.items():
        if bucket:
            yield key, bucket


def _pending_priorities(engine: Engine, dataset_id: int | None) -> list[int]:
    query = (
        select(Dataset.priority)
        .join(Job, Job.dataset_id == Dataset.id)
        .where(Job.status == JobStatus.PENDING.value)
        .distinct()
        .order_by(Dataset.priority.desc())
    )
    if dataset_id is not None:
        query = query.where(Dataset.id == dataset_id)
    with engine.connect() as conn:
        return [int(p) for p in conn.execute(query).scalars()]


def _pending_page(engine: Engine, dataset_id: int | None, after: str, priority: int) -> list[PendingRow]:
    query = (
        select(Job.id, *(Job.__table__.c[name] for name in RENDER_GROUP_FIELDS))
        .join(Dataset, Dataset.id == Job.dataset_id)
        .where(Job.status == JobStatus.PENDING.value, Job.id > after, Dataset.priority == priority)
        .order_by(Job.id)
        .limit(_PAGE)
    )
    if dataset_id is not None:
        query = query.where(Job.dataset_id == dataset_id)
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(query)]


def _mark(engine: Engine, published: list[str], stranded: dict[str, list[str]]) -> None:
    if not published and not stranded:
        return
    with engine.begin() as conn:
        transitions.mark_queued(conn, published)
        for reason, job_ids in stranded.items():
            transitions.note_unroutable(conn, job_ids, reason)
