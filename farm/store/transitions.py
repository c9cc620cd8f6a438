"""The one place that writes job states. Every transition is a guarded UPDATE, so a duplicate delivery
or a late worker can never move a job backwards or render it twice.

The per-dataset counts `farm status` reads (job_counts) follow every change here by themselves: triggers on jobs
add each statement's net change per (dataset, state) in its transaction (farm/store/counts.py, migration 0010),
so a transition that moves many rows, or none, needs no bookkeeping of its own."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    ColumnElement,
    Float,
    Integer,
    String,
    Text,
    and_,
    any_,
    bindparam,
    cast,
    column,
    func,
    or_,
    select,
    update,
    values,
)
from sqlalchemy.engine import Connection

from farm.job import CLAIMED_FIELDS, Claimed, Scores
from farm.storage import StoredObject
from farm.store import verdicts
from farm.store.schema import UNFINISHED, Dataset, DatasetRecipe, Job, JobStatus, utcnow

# SQLite allows 32766 bound parameters; stay far below for IN lists.
_CHUNK = 5000
_ERROR_MAX_CHARS = 4000


def _id_in(conn: Connection, job_ids: Sequence[str]) -> ColumnElement[bool]:
    """`id IN (…)`; on PostgreSQL one array parameter, which parses far faster than thousands of them."""
    if conn.dialect.name == "postgresql":
        return Job.id == any_(bindparam(None, list(job_ids), type_=ARRAY(String)))
    return Job.id.in_(list(job_ids))


def mark_queued(conn: Connection, job_ids: Sequence[str], *, queue: str) -> list[str]:
    """pending → queued on ``queue``, before their task is published; returns the ids this call took.

    Guarded on `pending`, so of two dispatchers offering the same job only one takes it (and publishes it).
    """
    taken: list[str] = []
    now = utcnow()
    for chunk in _chunks(job_ids):
        taken += (
            conn.execute(
                update(Job)
                .where(_id_in(conn, chunk), Job.status == JobStatus.PENDING.value)
                .values(status=JobStatus.QUEUED.value, routing_note=None, queue=queue, queued_at=now)
                .returning(Job.id)
            )
            .scalars()
            .all()
        )
    return taken


def resend_stale(conn: Connection, *, queue: str, sent_before: datetime, limit: int) -> list[str]:
    """Queued jobs on ``queue`` last sent before ``sent_before`` (their message was lost or is stuck): their
    send time is moved to now and the ids returned, to be published again. A duplicate is a no-op at claim."""
    stale = (
        select(Job.id)
        .where(Job.status == JobStatus.QUEUED.value, Job.queue == queue, Job.queued_at < sent_before)
        .order_by(Job.queued_at)
        .limit(limit)
    )
    return list(
        conn.execute(
            update(Job)
            .where(Job.id.in_(stale.scalar_subquery()), Job.status == JobStatus.QUEUED.value)
            .where(Job.queued_at < sent_before)
            .values(queued_at=utcnow())
            .returning(Job.id)
        )
        .scalars()
        .all()
    )


def claim(conn: Connection, job_ids: Sequence[str], *, worker: str, lease_s: int, max_attempts: int) -> list[Claimed]:
    """Take ownership of the jobs that are still waiting (or whose lease expired), counting an attempt.

    A job is claimable when pending or queued, or running with an expired lease (its worker died or froze).
    Never when running under a live lease, whoever holds it: a duplicate or late message is a no-op, also for
    the worker incarnation that is rendering the job right now. Each claim takes the next claim_seq, the
    fencing token of everything the attempt writes. Jobs out of attempts are not claimed.
    """
    now = utcnow()
    claimable = and_(
        _id_in(conn, job_ids),
        Job.attempts < max_attempts,
        Job.dataset_id.not_in(select(Dataset.id).where(Dataset.paused)),
        or_(
            Job.status.in_([JobStatus.PENDING.value, JobStatus.QUEUED.value]),
            and_(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < now),
        ),
    )
    result = conn.execute(
        update(Job)
        .where(claimable)
        .values(
            status=JobStatus.RUNNING.value,
            attempts=Job.attempts + 1,
            claim_seq=Job.claim_seq + 1,
            worker=worker,
            started_at=now,
            lease_expires_at=now + timedelta(seconds=lease_s),
        )
        .returning(*(Job.__table__.c[name] for name in CLAIMED_FIELDS))
    )
    order = {job_id: i for i, job_id in enumerate(job_ids)}
    rows = sorted(result.all(), key=lambda r: order[r.id])
    return [Claimed(**row._asdict()) for row in rows]


def _holds(worker: str, job_id: str, seq: int) -> ColumnElement[bool]:
    """The fence: the job is running under this incarnation's claim ``seq`` and no other."""
    return and_(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.worker == worker, Job.claim_seq == seq)


def mark_succeeded(
    conn: Connection,
    job_id: str,
    *,
    worker: str,
    seq: int,
    stored: StoredObject,
    render_ms: int,
    recipe: str | None = None,
    noted: set[tuple[int, str]] | None = None,
    scores: Scores | None = None,
    lines: set[str] | None = None,
) -> bool:
    """running → succeeded, only for the attempt that holds the job (worker and claim_seq), with a confirmed object,
    the recipe it was rendered with (JSON, models/recipe.py) and its scores (farm/store/verdicts.py).

    A try of a yield-targeted line has its line decided in this transaction; with ``lines`` given, its line is
    added there instead, for the caller to decide once for a whole batch (mark_succeeded_many)."""
    result = conn.execute(
        update(Job)
        .where(_holds(worker, job_id, seq))
        .values(
            status=JobStatus.SUCCEEDED.value,
            finished_at=utcnow(),
            lease_expires_at=None,
            output_uri=stored.uri,
            sha256=stored.sha256,
            bytes=stored.bytes,
            render_ms=render_ms,
            recipe=recipe,
            error=None,
            **verdicts.score_values(scores),
        )
        .returning(Job.dataset_id, Job.line_id)
    )
    won = result.first()
    if won is None:
        return False
    dataset = int(won.dataset_id)
    if recipe is not None and (noted is None or (dataset, recipe) not in noted):
        note_recipe(conn, dataset, recipe)
        if noted is not None:
            noted.add((dataset, recipe))
    if scores is not None:
        verdicts.store_embedding(conn, job_id, dataset, scores)
    if won.line_id is not None:
        if lines is not None:
            lines.add(won.line_id)
        else:
            verdicts.decide(conn, [won.line_id])
    return True


def note_recipe(conn: Connection, dataset_id: int, recipe: str) -> None:
    """Add a recipe to the dataset's distinct recipes (dataset_recipes) if it is not there yet."""
    digest = hashlib.sha256(recipe.encode()).hexdigest()
    values = {"dataset_id": dataset_id, "digest": digest, "recipe": recipe, "first_seen": utcnow()}
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        conn.execute(pg_insert(DatasetRecipe).values(**values).on_conflict_do_nothing())
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        conn.execute(sqlite_insert(DatasetRecipe).values(**values).on_conflict_do_nothing())


def mark_succeeded_many(
    conn: Connection,
    done: Sequence[tuple[str, int, StoredObject, int]],
    *,
    worker: str,
    recipes: Mapping[str, str] | None = None,
    scores: Mapping[str, Scores] | None = None,
    deletes: list[str] | None = None,
) -> set[str]:
    """mark_succeeded for a batch of (job id, seq, object, render ms), in the caller's one transaction; returns the
    ids that were marked. `recipes`: each job's render recipe; `scores`: each scored job's scores. The lines of
    the batch's yield-targeted tries are decided once, at the end; `deletes` receives the URIs of images their
    verdicts rejected with keep-rejected no (to delete once this transaction commits).

    On PostgreSQL a batch is one guarded UPDATE … FROM (VALUES …): one statement (and one run of the counting
    trigger) for the batch instead of one per image; each row keeps its own fence (worker, claim_seq, running)."""
    recipes = recipes or {}
    scores = scores or {}
    if conn.dialect.name != "postgresql" or len(done) < 2:
        noted: set[tuple[int, str]] = set()  # a batch shares its recipe: one insert per batch, not per image
        lines: set[str] = set()
        marked = {
            job_id
            for job_id, seq, stored, render_ms in done
            if mark_succeeded(
                conn,
                job_id,
                worker=worker,
                seq=seq,
                stored=stored,
                render_ms=render_ms,
                recipe=recipes.get(job_id),
                noted=noted,
                scores=scores.get(job_id),
                lines=lines,
            )
        }
    else:
        won = _mark_succeeded_set(conn, done, worker=worker, recipes=recipes, scores=scores)
        marked = {job_id for job_id, _dataset, _line in won}
        datasets = {job_id: dataset for job_id, dataset, _line in won}
        for dataset, recipe in {(datasets[j], r) for j, r in recipes.items() if j in datasets}:
            note_recipe(conn, dataset, recipe)
        for job_id in marked:
            if job_id in scores:
                verdicts.store_embedding(conn, job_id, datasets[job_id], scores[job_id])
        lines = {line for _job, _dataset, line in won if line is not None}
    if lines:
        decided = verdicts.decide(conn, lines)
        if deletes is not None:
            deletes.extend(decided.delete_uris)
    return marked


_SCORE_COLUMNS: dict[str, Any] = {
    "pixel_sha256": String(64),
    "clip_score": Float(),
    "aesthetic_score": Float(),
    "nsfw": Boolean(),
    "scored_by": Text(),
}


def _mark_succeeded_set(
    conn: Connection,
    done: Sequence[tuple[str, int, StoredObject, int]],
    *,
    worker: str,
    recipes: Mapping[str, str],
    scores: Mapping[str, Scores],
) -> list[tuple[str, int, str | None]]:
    """One guarded UPDATE for the batch (PostgreSQL); returns (job id, dataset id, line id) of the rows marked."""
    rows = [
        (
            job_id,
            seq,
            stored.uri,
            stored.sha256,
            stored.bytes,
            render_ms,
            recipes.get(job_id),
            *(verdicts.score_values(scores.get(job_id)).get(name) for name in _SCORE_COLUMNS),
        )
        for job_id, seq, stored, render_ms in done
    ]
    given = values(
        column("id", String(32)),
        column("seq", Integer()),
        column("uri", Text()),
        column("sha256", String(64)),
        column("bytes", BigInteger()),
        column("render_ms", Integer()),
        column("recipe", Text()),
        *(column(name, kind) for name, kind in _SCORE_COLUMNS.items()),
        name="done",
    ).data(rows)
    scored = any(job_id in scores for job_id, *_rest in done)
    result = conn.execute(
        update(Job)
        .where(
            Job.id == given.c.id,
            Job.id == any_(cast([job_id for job_id, *_rest in done], ARRAY(String))),
            Job.status == JobStatus.RUNNING.value,
            Job.worker == worker,
            Job.claim_seq == given.c.seq,
        )
        .values(
            status=JobStatus.SUCCEEDED.value,
            finished_at=utcnow(),
            lease_expires_at=None,
            output_uri=given.c.uri,
            sha256=given.c.sha256,
            bytes=given.c.bytes,
            render_ms=given.c.render_ms,
            recipe=cast(given.c.recipe, Text()),  # a column of NULLs in VALUES has no type of its own
            error=None,
            **({name: cast(given.c[name], kind) for name, kind in _SCORE_COLUMNS.items()} if scored else {}),
        )
        .returning(Job.id, Job.dataset_id, Job.line_id)
    )
    return [(str(job_id), int(dataset), line) for job_id, dataset, line in result]


def mark_attempt_failed(
    conn: Connection,
    job_id: str,
    *,
    worker: str,
    seq: int,
    error: str,
    max_attempts: int,
    retry_at: datetime | None = None,
    deletes: list[str] | None = None,
) -> JobStatus | None:
    """running → queued for another attempt (sent at ``retry_at``), or → failed after the last one. Returns the
    new state, or None if this attempt no longer holds the job (it was reaped, canceled or claimed again).

    A try of a yield-targeted line that fails for good is spent: its line is decided on (and tries the next seed)
    in this transaction; `deletes` receives what mark_succeeded_many's does."""
    row = conn.execute(select(Job.attempts, Job.error, Job.line_id).where(_holds(worker, job_id, seq))).first()
    if row is None:
        return None
    attempts = row.attempts
    target = JobStatus.FAILED if attempts >= max_attempts else JobStatus.QUEUED
    values: dict[str, object] = {
        "status": target.value,
        "lease_expires_at": None,
        "error": _with_attempt(row.error, f"attempt {attempts}: {error}"),
    }
    if target is JobStatus.FAILED:
        values["finished_at"] = utcnow()
    else:
        values["queued_at"] = retry_at or utcnow()
    result = conn.execute(update(Job).where(_holds(worker, job_id, seq), Job.attempts == attempts).values(**values))
    if result.rowcount != 1:
        return None
    if target is JobStatus.FAILED and row.line_id is not None:
        decided = verdicts.decide(conn, [row.line_id])
        if deletes is not None:
            deletes.extend(decided.delete_uris)
    return target


def _with_attempt(previous: str | None, line: str) -> str:
    """Every attempt's error, one line each, oldest first; the oldest lines go past _ERROR_MAX_CHARS."""
    text = f"{previous}\n{line}" if previous else line
    if len(text) <= _ERROR_MAX_CHARS:
        return text
    tail = text[-_ERROR_MAX_CHARS:]
    return tail.split("\n", 1)[1] if "\n" in tail else tail


def note_unroutable(conn: Connection, job_ids: Sequence[str], reason: str) -> int:
    """Record on still-pending jobs why no pool could take them (shown by `farm status`). Jobs that already carry
    this reason are left alone: the leader looks at them every round, and rewriting a row (a new row version, the
    count triggers) to the same note is pure cost. Returns how many notes changed."""
    note, changed = reason[:1000], 0
    for chunk in _chunks(job_ids):
        changed += conn.execute(
            update(Job)
            .where(_id_in(conn, chunk), Job.status == JobStatus.PENDING.value, Job.routing_note.is_distinct_from(note))
            .values(routing_note=note)
        ).rowcount
    return changed


def mark_pending(conn: Connection, job_ids: Sequence[str]) -> int:
    """queued → pending, for jobs whose message never reached the broker, so `farm dispatch` sends them."""
    moved = 0
    for chunk in _chunks(job_ids):
        result = conn.execute(
            update(Job)
            .where(_id_in(conn, chunk), Job.status == JobStatus.QUEUED.value)
            .values(status=JobStatus.PENDING.value)
        )
        moved += result.rowcount
    return moved


@dataclass(frozen=True)
class Reaped:
    """Jobs whose worker stopped renewing its lease."""

    requeued: list[str]
    failed: list[str]


# Appended to the job's earlier attempts' errors, as mark_attempt_failed does.
_reaped_error = func.coalesce(Job.error + "\n", "") + (
    "attempt " + cast(Job.attempts, String) + ": lease expired (worker " + Job.worker + " stopped)"
)


def reap_expired(conn: Connection, *, max_attempts: int) -> Reaped:
    """running with an expired lease → pending (sent again by dispatch), or → failed when out of attempts.

    Pending, not queued: the reaped job has no message on the broker, and dispatch sends pending jobs.
    """
    now = utcnow()
    expired = and_(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < now)
    requeued = (
        conn.execute(
            update(Job)
            .where(expired, Job.attempts < max_attempts)
            .values(
                status=JobStatus.PENDING.value,
                lease_expires_at=None,
                error=_reaped_error,
            )
            .returning(Job.id)
        )
        .scalars()
        .all()
    )
    failed = conn.execute(
        update(Job)
        .where(expired, Job.attempts >= max_attempts)
        .values(
            status=JobStatus.FAILED.value,
            lease_expires_at=None,
            finished_at=now,
            error=_reaped_error,
        )
        .returning(Job.id, Job.line_id)
    ).all()
    # Tries of yield-targeted lines that failed for good: their lines try the next seed. Images a verdict here
    # rejects with keep-rejected no are no longer named by their rows; `farm gc` removes them.
    verdicts.decide(conn, [line_id for _job_id, line_id in failed])
    return Reaped(list(requeued), [job_id for job_id, _line_id in failed])


def cancel(conn: Connection, *, dataset_id: int | None = None, job_ids: Sequence[str] = ()) -> int:
    """Any unfinished job → canceled. A worker rendering one finds out when it tries to mark it."""
    unfinished = Job.status.in_([s.value for s in UNFINISHED])
    values = {"status": JobStatus.CANCELED.value, "finished_at": utcnow(), "lease_expires_at": None}
    if dataset_id is not None:
        return conn.execute(update(Job).where(Job.dataset_id == dataset_id, unfinished).values(**values)).rowcount
    moved = 0
    for chunk in _chunks(job_ids):
        moved += conn.execute(update(Job).where(_id_in(conn, chunk), unfinished).values(**values)).rowcount
    return moved


def _chunks(items: Sequence[str]) -> list[Sequence[str]]:
    return [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]


def set_paused(conn: Connection, dataset_id: int, paused: bool) -> None:
    """Pause or resume a dataset: workers skip a paused dataset's jobs (their messages are dropped)."""
    conn.execute(update(Dataset).where(Dataset.id == dataset_id).values(paused=paused))


def requeue_queued(conn: Connection, dataset_id: int) -> int:
    """queued → pending for a dataset: on pause, so its jobs leave the dispatch window (their messages become
    no-ops), and dispatch sends them again after resume."""
    return conn.execute(
        update(Job)
        .where(Job.dataset_id == dataset_id, Job.status == JobStatus.QUEUED.value)
        .values(status=JobStatus.PENDING.value)
    ).rowcount


def retry_finished(conn: Connection, dataset_id: int, state: JobStatus) -> int:
    """failed or canceled → pending with a fresh set of attempts. The claim sequence goes on (the fence never
    repeats); the earlier errors stay until the job succeeds."""
    if state not in (JobStatus.FAILED, JobStatus.CANCELED):
        raise ValueError(f"only failed or canceled jobs are retried, not {state}")
    return conn.execute(
        update(Job)
        .where(Job.dataset_id == dataset_id, Job.status == state.value)
        .values(status=JobStatus.PENDING.value, attempts=0, finished_at=None, worker=None)
    ).rowcount


def renew_leases(conn: Connection, *, worker: str, held: Sequence[tuple[str, int]], lease_s: int) -> set[str]:
    """Renew the leases of the jobs this incarnation holds in memory, (job id, claim seq) each; returns the ids
    still held. A job missing from the answer was canceled, reaped or claimed again: its attempt must stop."""
    wanted = dict(held)
    renewed: set[str] = set()
    until = utcnow() + timedelta(seconds=lease_s)
    for chunk in _chunks(list(wanted)):
        rows = conn.execute(
            update(Job)
            .where(_id_in(conn, chunk), Job.status == JobStatus.RUNNING.value, Job.worker == worker)
            .values(lease_expires_at=until)
            .returning(Job.id, Job.claim_seq)
        ).all()
        renewed |= {row.id for row in rows if wanted.get(row.id) == row.claim_seq}
    return renewed


def release(conn: Connection, *, worker: str, held: Sequence[tuple[str, int]]) -> list[str]:
    """running → pending for attempts this incarnation gives back unfinished (a SIGTERM's grace ran out, a
    result could not be recorded): the attempt is not counted, and dispatch sends the job again at once."""
    released: list[str] = []
    for job_id, seq in held:
        result = conn.execute(
            update(Job)
            .where(_holds(worker, job_id, seq))
            .values(
                status=JobStatus.PENDING.value,
                attempts=func.max(Job.attempts - 1, 0)
                if conn.dialect.name == "sqlite"
                else func.greatest(Job.attempts - 1, 0),
                lease_expires_at=None,
            )
        )
        if result.rowcount == 1:
            released.append(job_id)
    return released


def set_priority(conn: Connection, dataset_id: int, priority: int) -> None:
    """0–9, higher first; applies to the dataset's jobs dispatched from now on."""
    conn.execute(update(Dataset).where(Dataset.id == dataset_id).values(priority=priority))
