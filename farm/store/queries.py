"""Reading progress from the job store: counts per state, throughput, ETA, and job listings."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from farm.errors import UnknownDataset
from farm.store.progress import RATE_SAMPLE as RATE_SAMPLE
from farm.store.progress import RATE_WINDOW_S as RATE_WINDOW_S
from farm.store.progress import REASON_SAMPLE as REASON_SAMPLE
from farm.store.progress import Acceptance as Acceptance
from farm.store.progress import DatasetStatus, connection_reader, read_statuses
from farm.store.schema import UNFINISHED, Dataset, Job, JobStatus


@dataclass(frozen=True)
class JobRow:
    """One line of `farm jobs`."""

    id: str
    status: str
    attempts: int
    source_line: int | None
    source_file: str | None
    prompt: str
    seed: int
    worker: str | None
    output_uri: str | None
    error: str | None
    # Yield-targeted lines only (else None): which try, its scores and verdict.
    try_index: int | None = None
    clip_score: float | None = None
    aesthetic_score: float | None = None
    nsfw: bool | None = None
    verdict: str | None = None
    verdict_reason: str | None = None


def has_unfinished(engine: Engine) -> bool:
    """Whether any job of any dataset is pending, queued or running."""
    with engine.connect() as conn:
        found = conn.execute(select(Job.id).where(Job.status.in_([s.value for s in UNFINISHED])).limit(1)).first()
    return found is not None


def dataset_id(engine: Engine, name: str) -> int:
    """The id of a dataset by name, or UnknownDataset."""
    found = find_dataset_id(engine, name)
    if found is None:
        raise UnknownDataset(f"no dataset named {name!r}")
    return found


def find_dataset_id(engine: Engine, name: str) -> int | None:
    """The id of a dataset by name, or None: for callers that must tell "no such dataset" from other answers."""
    with engine.connect() as conn:
        found = conn.execute(select(Dataset.id).where(Dataset.name == name)).scalar()
    return None if found is None else int(found)


def dataset_model(engine: Engine, name: str) -> str | None:
    """The model a dataset's jobs use (its most recently recorded job's), or None for a new dataset."""
    with engine.connect() as conn:
        return conn.execute(
            select(Job.model)
            .join(Dataset, Dataset.id == Job.dataset_id)
            .where(Dataset.name == name)
            .order_by(Job.created_at.desc())
            .limit(1)
        ).scalar()


def job_state(engine: Engine, job_id: str) -> str | None:
    """A job's state by its id, or None when no job has that id."""
    with engine.connect() as conn:
        found = conn.execute(select(Job.status).where(Job.id == job_id)).scalar()
    return None if found is None else str(found)


def dataset_status(engine: Engine, name: str, *, now: datetime | None = None) -> DatasetStatus:
    """Counts per state (job_counts: at most 16 rows per state), images/s over the last RATE_WINDOW_S, and ETA."""
    with engine.connect() as conn:
        return read_statuses(connection_reader(conn), name, now=now)[0]


@dataclass(frozen=True)
class PoolProgress:
    """A pool's share of the watched datasets: images its workers finished, jobs they hold now, speed."""

    pool: str
    succeeded: int
    running: int
    workers_alive: int
    images_per_s: float


def pool_progress(engine: Engine, names: list[str], *, beat_s: float) -> list[PoolProgress]:
    """Per pool (from the workers' heartbeats), for the jobs of the named datasets."""
    from farm.store.fleet import list_workers
    from farm.store.schema import Worker

    by_pool: dict[str, dict[str, float]] = {}

    def entry(pool: str | None) -> dict[str, float]:
        return by_pool.setdefault(pool or "(no pool)", {"succeeded": 0, "running": 0, "alive": 0, "rate": 0.0})

    with engine.connect() as conn:
        counted = conn.execute(
            select(Worker.pool, Job.status, func.count())
            .select_from(Job)
            .join(Dataset, Dataset.id == Job.dataset_id)
            .join(Worker, Worker.name == Job.worker)
            .where(Dataset.name.in_(names), Job.status.in_([JobStatus.SUCCEEDED.value, JobStatus.RUNNING.value]))
            .group_by(Worker.pool, Job.status)
        ).all()
    for pool, state, n in counted:
        entry(pool)[state] += int(n)
    for worker in list_workers(engine, beat_s=beat_s):
        if worker.state == "alive":
            entry(worker.pool)["alive"] += 1
            entry(worker.pool)["rate"] += worker.images_per_s
    return [
        PoolProgress(pool, int(v["succeeded"]), int(v["running"]), int(v["alive"]), v["rate"])
        for pool, v in sorted(by_pool.items())
    ]


def all_statuses(engine: Engine) -> list[DatasetStatus]:
    """Every dataset's status, oldest first, read on one connection."""
    with engine.connect() as conn:
        return read_statuses(connection_reader(conn))


def list_jobs(
    engine: Engine, name: str, *, state: str | None = None, verdict: str | None = None, limit: int = 50
) -> list[JobRow]:
    """Jobs of a dataset, optionally in one state or with one verdict, in file order (a line's tries in order)."""
    ds_id = dataset_id(engine, name)
    query = (
        select(
            Job.id,
            Job.status,
            Job.attempts,
            Job.source_line,
            Job.source_file,
            Job.prompt,
            Job.seed,
            Job.worker,
            Job.output_uri,
            Job.error,
            Job.try_index,
            Job.clip_score,
            Job.aesthetic_score,
            Job.nsfw,
            Job.verdict,
            Job.verdict_reason,
        )
        .where(Job.dataset_id == ds_id)
        .order_by(Job.source_file, Job.source_line, Job.line_id, Job.try_index, Job.seed)
        .limit(limit)
    )
    if state is not None:
        query = query.where(Job.status == state)
    if verdict is not None:
        query = query.where(Job.verdict == verdict)
    with engine.connect() as conn:
        return [JobRow(**row._asdict()) for row in conn.execute(query)]
