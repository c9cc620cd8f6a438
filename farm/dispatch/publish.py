"""Dispatch: keep a bounded window of tasks per queue on the broker, and send again what the broker lost.

Jobs are taken (pending → queued, guarded) before they are published, page by page, each group of compatible
jobs to its pool's queue. The broker never holds the whole backlog: each queue holds a window sized from the live
workers that consume it (Router.window: a couple of tasks each, more for fast workers; FARM_DISPATCH_WINDOW caps
it), and the control loop's leader tops it up every second as workers drain it (workers/control.py). So a
higher priority, a pause or a cancel is never more than a window's work behind.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from celery import Celery
from kombu.exceptions import ChannelError as KombuChannelError
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy import exists, func, select
from sqlalchemy.engine import Connection, Engine

from farm.dispatch.broker import RENDER_TASK
from farm.dispatch.routing import Needs, Router
from farm.errors import BrokerUnavailable
from farm.job import RENDER_GROUP_FIELDS
from farm.secrets import redact
from farm.settings import Settings
from farm.store import transitions
from farm.store.schema import Dataset, Job, JobStatus, utcnow

log = logging.getLogger(__name__)
_PAGE = 10_000
_DISPATCH_LOCK = 0x6661726D_64697370 & 0x7FFFFFFFFFFFFFFF  # "farmdisp": the advisory lock dispatchers share

# A pending row: its id, then its render group (farm/job.py's RENDER_GROUP_FIELDS, as JobSpec.render_group).
PendingRow = tuple[Any, ...]
Taken = list[tuple[PendingRow, str, list[str]]]  # (render group, queue, job ids): one task each


@dataclass(frozen=True)
class Dispatched:
    """What one dispatch sent."""

    jobs: int
    tasks: int
    unroutable: int = 0  # left pending: no live pool serves them (the reason is on each job)
    waiting: bool = False  # pending jobs wait for room in their queue's window (sent as workers drain it)
    per_queue: dict[str, int] = field(default_factory=dict)  # jobs sent to each queue

    def describe(self, seconds: float) -> str:
        """One line for the CLI."""
        line = f"dispatched {self.jobs} jobs in {self.tasks} tasks in {seconds:.2f} s"
        if self.waiting:
            line += "; the rest wait for room in the broker's window and go as workers drain it"
        if self.unroutable:
            line += f"; {self.unroutable} jobs unroutable (no live pool serves them; see `farm status`)"
        return line


def dispatch_pending(
    engine: Engine,
    app: Celery,
    settings: Settings,
    *,
    dataset_id: int | None = None,
    router: Router | None = None,
    max_pages: int | None = None,
) -> Dispatched:
    """Top up each queue's window: send pending jobs (of one dataset, or all; higher priority first) until the
    queue holds its window of queued jobs (Router.window). Paused datasets' jobs stay pending.

    Each page is taken in one transaction (FOR UPDATE SKIP LOCKED on PostgreSQL; on SQLite, a guarded UPDATE …
    RETURNING under its single writer), so two dispatchers never take the same job; the taken jobs are published
    after the commit. A crash in between leaves jobs queued without a message, which resend_lost sends again.
    Jobs no live pool can serve stay pending with the reason recorded (farm/dispatch/routing.py). `max_pages`
    bounds the pages read (the leader's every-second top-up: what is left is `waiting`, for the next round).
    """
    router = router or Router.load(engine, settings)
    room = _Room(lambda queue: router.window(queue, settings.batch_size, settings.dispatch_window))
    room.page_size = min(_PAGE, 2 * sum(room.window(q) for q in router.queues()))
    sent_jobs = sent_tasks = unroutable = 0
    per_queue: dict[str, int] = {}
    waiting = False
    pages = 0
    for level in _pending_priorities(engine, dataset_id):
        after: str | None = ""
        while after is not None and not room.all_full():
            if max_pages is not None and pages >= max_pages:
                waiting = True
                break
            pages += 1
            taken, stranded, full, after = _take_page(engine, router, room, dataset_id, after, level, settings)
            room.page_size = min(_PAGE, 2 * room.page_size)  # a backlog the windows do not take: larger pages
            waiting = waiting or full
            unroutable += sum(len(ids) for ids in stranded.values())
            sent_tasks += _publish_groups(app, engine, settings, taken, level, sent_jobs)
            sent_jobs += sum(len(ids) for _key, _queue, ids in taken)
            for _key, queue, ids in taken:
                per_queue[queue] = per_queue.get(queue, 0) + len(ids)
        waiting = waiting or after is not None
    if sent_jobs or unroutable:
        log.info("dispatched %d jobs in %d tasks; %d unroutable", sent_jobs, sent_tasks, unroutable)
    return Dispatched(sent_jobs, sent_tasks, unroutable, waiting, per_queue)


class _Room:
    """How many more jobs each queue's window takes: counted in each page's transaction (after the dispatch lock,
    on PostgreSQL, so concurrent dispatchers never overfill it), then kept up to date within the page."""

    def __init__(self, window: Callable[[str], int]) -> None:
        self.window = window  # queue → the most queued jobs it may hold
        self._left: dict[str, int] = {}
        self._conn: Connection | None = None
        self.page_size = _PAGE  # pending rows read by the next page: twice what the windows take, then doubling

    def recount(self, conn: Connection) -> None:
        """Forget the counts: the next page counts again, in its own transaction."""
        self._conn = conn
        self._left = {}

    def left(self, queue: str) -> int:
        if queue not in self._left:
            assert self._conn is not None
            queued = self._conn.execute(
                select(func.count()).where(Job.status == JobStatus.QUEUED.value, Job.queue == queue)
            ).scalar_one()
            self._left[queue] = max(0, self.window(queue) - int(queued))
        return self._left[queue]

    def use(self, queue: str, count: int) -> None:
        self._left[queue] = self.left(queue) - count

    def all_full(self) -> bool:
        """Every queue met so far is full: pages further on would only be read and locked for nothing. (A pool
        whose jobs all lie behind a full pool's waits for the next round, when the full pool has drained.)"""
        return bool(self._left) and not any(self._left.values())


def _take_page(
    engine: Engine,
    router: Router,
    room: _Room,
    dataset_id: int | None,
    after: str,
    priority: int,
    settings: Settings,
) -> tuple[Taken, dict[str, list[str]], bool, str | None]:
    """Take one page of pending jobs into their queues' windows, in one transaction.

    Returns the tasks to publish, the unroutable ids by reason, whether a window was full, and where the next
    page starts (None when this priority level has no more pending jobs).
    """
    taken: Taken = []
    stranded: dict[str, list[str]] = {}
    full = False
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # One dispatcher at a time takes into the windows (SQLite's single writer does this by itself).
            conn.execute(select(func.pg_advisory_xact_lock(_DISPATCH_LOCK)))
        room.recount(conn)
        page = _pending_page(conn, dataset_id, after, priority, room.page_size)
        for key, job_ids in group_jobs(page, router.largest_task(settings.batch_size)):
            group = dict(zip(RENDER_GROUP_FIELDS, key, strict=True))
            pixels = group["width"] * group["height"]
            route = router.route(Needs(group["model"], group["controlnet"], pixels, group["quantize"], group["scorer"]))
            if route.queue is None:
                stranded.setdefault(route.reason or "unroutable", []).extend(job_ids)
                continue
            fits = job_ids[: room.left(route.queue)]
            full = full or len(fits) < len(job_ids)
            if not fits:
                continue
            mine = transitions.mark_queued(conn, fits, queue=route.queue)
            room.use(route.queue, len(mine))
            size = router.task_jobs(route.queue, settings.batch_size)
            taken.extend((key, route.queue, mine[start : start + size]) for start in range(0, len(mine), size))
        for reason, job_ids in stranded.items():
            transitions.note_unroutable(conn, job_ids, reason)
    return taken, stranded, full, (page[-1][0] if len(page) == room.page_size else None)


def _publish_groups(app: Celery, engine: Engine, settings: Settings, taken: Taken, priority: int, before: int) -> int:
    """Publish taken jobs, one task per group; on a broker failure the unpublished ones go back to pending."""
    published = 0
    try:
        with app.producer_or_acquire() as producer:
            for _key, queue, job_ids in taken:
                _publish(app, producer, app.amqp.queues[queue], job_ids, priority)
                published += 1
    except (KombuOperationalError, OSError) as exc:
        unsent = [job_id for _key, _queue, ids in taken[published:] for job_id in ids]
        with engine.begin() as conn:
            transitions.mark_pending(conn, unsent)
        sent = before + sum(len(ids) for _key, _queue, ids in taken[:published])
        raise BrokerUnavailable(
            f"broker {redact(settings.broker_url)} unreachable ({exc.__class__.__name__}); "
            f"{sent} jobs sent before it failed"
        ) from exc
    return published


def _publish(app: Celery, producer: Any, queue: Any, job_ids: list[str], priority: int) -> None:
    # The lower-level half of send_task: the same message, without per-call routing and signal work,
    # which is most of the cost when publishing tens of thousands of tasks.
    # argsrepr given: Celery would otherwise build a safe repr of every id list (a third of the cost).
    message = app.amqp.create_task_message(
        uuid.uuid4().hex, RENDER_TASK, [job_ids], {}, argsrepr=f"[{len(job_ids)} job ids]", kwargsrepr="{}"
    )
    # kombu's Redis transport serves message priority 0 first; ours is "higher first", so invert it.
    app.amqp.send_task_message(producer, RENDER_TASK, message, queue=queue, retry=False, priority=9 - priority)


def queued_per_queue(engine: Engine) -> dict[str, int]:
    """Queued jobs per queue: what each window holds now (ix_jobs_status_queued: as many rows as the windows hold)."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(Job.queue, func.count()).where(Job.status == JobStatus.QUEUED.value).group_by(Job.queue)
        ).all()
    return {str(queue): int(n) for queue, n in rows if queue is not None}


def has_room(settings: Settings, router: Router, queued: dict[str, int]) -> bool:
    """Whether some queue's window is half empty (and has room for a task), given what each holds: what the leader
    checks every second before topping up. Half a window is at least REFILL_S/2 seconds of its workers' work, more
    than a tick, so they never wait; refilling by halves keeps the top-ups (and their fixed cost) few."""

    def low(queue: str) -> bool:
        window = router.window(queue, settings.batch_size, settings.dispatch_window)
        task = min(router.task_jobs(queue, settings.batch_size), window)
        return window - int(queued.get(queue, 0)) >= max(task, window // 2)

    return any(low(queue) for queue in router.queues())


def newest_pending(engine: Engine) -> Any:
    """When the newest pending job was created (None: no pending job): one step down ix_jobs_status_created. The
    leader compares it between ticks to send what `farm submit` just recorded within a second."""
    with engine.connect() as conn:
        return conn.execute(select(func.max(Job.created_at)).where(Job.status == JobStatus.PENDING.value)).scalar()


def resend_lost(engine: Engine, app: Celery, settings: Settings, *, grace_s: float) -> int:
    """Send again queued jobs whose message was lost (a broker restarted without persistence, a dispatcher died
    between taking and publishing) or is stuck; returns how many. A duplicate is a no-op at claim.

    A queue whose broker side is empty while the database has jobs waiting on it has lost their messages: the
    ones sent more than ``grace_s`` ago go again at once. On a queue that still holds messages, a job unclaimed
    a whole lease (settings.lease_s) after it was sent goes again.
    """
    with engine.connect() as conn:
        queues = [
            str(q)
            for q in conn.execute(
                select(Job.queue).where(Job.status == JobStatus.QUEUED.value, Job.queue.is_not(None)).distinct()
            ).scalars()
        ]
    resent = 0
    for queue in queues:
        size = _broker_size(app, queue)
        empty = size == 0
        age_s = grace_s if empty else float(settings.lease_s)
        with engine.begin() as conn:
            ids = transitions.resend_stale(
                conn, queue=queue, sent_before=utcnow() - timedelta(seconds=age_s), limit=settings.dispatch_window
            )
            groups = _groups_of(conn, ids)
        for priority, key, job_ids in groups:
            for start in range(0, len(job_ids), settings.batch_size):
                task = [(key, queue, job_ids[start : start + settings.batch_size])]
                _publish_groups(app, engine, settings, task, priority, resent)
        if ids:
            broker = (
                "empty: its messages were lost" if empty else "size unknown" if size is None else f"{size} messages"
            )
            log.warning(
                "%d queued jobs on %s were not claimed in time (broker queue %s); sent again", len(ids), queue, broker
            )
        resent += len(ids)
    return resent


def _broker_size(app: Celery, queue: str) -> int | None:
    """Messages waiting in the broker's queue (0 when the broker has no such queue: a restart forgot it); None when
    the broker cannot say."""
    try:
        with app.connection_for_write() as conn:
            return int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)
    except KombuChannelError as exc:
        # "NOT_FOUND" (404): the broker does not know the queue, so it holds none of its messages.
        return 0 if "404" in str(getattr(exc, "reply_code", "")) or "NOT_FOUND" in str(exc) else None
    except Exception:  # an unreachable broker: no verdict, so no fast resend
        return None


def _groups_of(conn: Connection, job_ids: list[str]) -> list[tuple[int, PendingRow, list[str]]]:
    """(dataset priority, render group, ids) of the given jobs."""
    if not job_ids:
        return []
    rows = conn.execute(
        select(Job.id, Dataset.priority, *(Job.__table__.c[name] for name in RENDER_GROUP_FIELDS))
        .join(Dataset, Dataset.id == Job.dataset_id)
        .where(Job.id.in_(job_ids))
        .order_by(Job.id)
    ).all()
    groups: dict[tuple[int, PendingRow], list[str]] = {}
    for row in rows:
        groups.setdefault((int(row[1]), tuple(row[2:])), []).append(str(row[0]))
    return [(priority, key, ids) for (priority, key), ids in groups.items()]


def reap_and_dispatch(
    engine: Engine, app: Celery, settings: Settings, *, grace_s: float = 10.0, router: Router | None = None
) -> tuple[transitions.Reaped, int, Dispatched]:
    """One round of the control loop (and of `farm reap`): expired leases back to pending, or failed after the
    last attempt; lost messages sent again; then each queue's window topped up."""
    with engine.begin() as conn:
        reaped = transitions.reap_expired(conn, max_attempts=settings.max_attempts)
    resent = resend_lost(engine, app, settings, grace_s=grace_s)
    return reaped, resent, dispatch_pending(engine, app, settings, router=router)


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
    """The priorities of unpaused datasets with a pending job: one index probe per dataset (ix_jobs_dataset_status),
    never a pass over the pending jobs, so a round with nothing to send costs next to nothing."""
    waiting = exists().where(Job.dataset_id == Dataset.id, Job.status == JobStatus.PENDING.value)
    query = (
        select(Dataset.priority).where(waiting, Dataset.paused.is_(False)).distinct().order_by(Dataset.priority.desc())
    )
    if dataset_id is not None:
        query = query.where(Dataset.id == dataset_id)
    with engine.connect() as conn:
        return [int(p) for p in conn.execute(query).scalars()]


def _pending_page(
    conn: Connection, dataset_id: int | None, after: str, priority: int, limit: int = _PAGE
) -> list[PendingRow]:
    query = (
        select(Job.id, *(Job.__table__.c[name] for name in RENDER_GROUP_FIELDS))
        .join(Dataset, Dataset.id == Job.dataset_id)
        .where(
            Job.status == JobStatus.PENDING.value,
            Job.id > after,
            Dataset.priority == priority,
            Dataset.paused.is_(False),
        )
        .order_by(Job.id)
        .limit(limit)
    )
    if dataset_id is not None:
        query = query.where(Job.dataset_id == dataset_id)
    if conn.dialect.name == "postgresql":
        # Rows another dispatcher is taking right now are skipped, not waited for.
        query = query.with_for_update(skip_locked=True, of=Job)
    return [tuple(r) for r in conn.execute(query)]
