"""Reading progress from the job store: counts per state, throughput, ETA, and job listings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.engine import Connection, Engine

from farm.errors import UnknownDataset
from farm.store.control import BacklogFigures, read_backlog
from farm.store.counts import NOT_STATES, UNROUTABLE, VERDICT_KEYS, counted_jobs, stored_counts
from farm.store.schema import FINISHED, UNFINISHED, Dataset, DatasetRecipe, Job, JobStatus, utcnow

# Throughput is measured over the recent past, so a paused-then-resumed run shows its current speed: the last
# RATE_WINDOW_S, or the newest RATE_SAMPLE images when more than that many finished in it (a fleet at 1,000 images/s
# finishes 120,000 in the window; reading that many index entries would make `farm status` grow with the fleet).
RATE_WINDOW_S = 120
RATE_SAMPLE = 2048
# Why jobs are unroutable: read from at most this many of them (their total is exact, from job_counts); beyond it
# the per-reason figures are the sample's shares of the total (DatasetStatus.reasons_estimated).
REASON_SAMPLE = 10_000


@dataclass(frozen=True)
class Acceptance:
    """A yield-targeted dataset's verdicts (job_counts) against what its lines want (datasets.accept_target)."""

    target: int  # accepted images its lines want in all
    accepted: int = 0
    rejected: int = 0
    duplicate: int = 0
    unscored: int = 0

    @property
    def decided(self) -> int:
        return self.accepted + self.rejected + self.duplicate + self.unscored

    @property
    def rate(self) -> float | None:
        """Accepted per decided try so far."""
        return self.accepted / self.decided if self.decided else None

    @property
    def projected_tries(self) -> int | None:
        """Tries the dataset will have taken to reach its target at the acceptance rate so far (the lines' max_tries
        may stop it short); None before any verdict or with none accepted yet."""
        rate = self.rate
        if not rate:
            return None
        return self.decided + math.ceil(max(self.target - self.accepted, 0) / rate)

    def as_dict(self) -> dict[str, object]:
        return {
            "target": self.target,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "duplicate": self.duplicate,
            "unscored": self.unscored,
            "acceptance_rate": None if self.rate is None else round(self.rate, 4),
            "projected_tries": self.projected_tries,
        }


@dataclass(frozen=True)
class DatasetStatus:
    """A dataset's progress."""

    name: str
    counts: dict[str, int]
    images_per_s: float
    eta_s: float | None
    unroutable: dict[str, int] = field(default_factory=dict)  # reason → pending jobs no live pool serves
    reasons_estimated: bool = False  # more unroutable jobs than REASON_SAMPLE: the figures per reason are shares
    recipes: int = 0  # distinct render recipes its images were made with (dataset_recipes)
    # Pool → its pending jobs, as the control loop's leader last counted them (farm/dispatch/backlog.py); None
    # when no leader has counted lately (no worker runs).
    pending_per_pool: dict[str, int] | None = None
    acceptance: Acceptance | None = None  # for a dataset with yield-targeted lines

    @property
    def warnings(self) -> list[str]:
        """What the user should know about the dataset as a whole."""
        if self.recipes > 1:
            return [
                f"its images were made with {self.recipes} render recipes (sampler, schedule or precision differ "
                "between workers or submits); `farm export` has each image's recipe"
            ]
        return []

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> int:
        return sum(self.counts[s.value] for s in FINISHED)

    @property
    def done(self) -> bool:
        """Nothing left to do: every job succeeded, failed or was canceled."""
        return self.finished == self.total

    def as_dict(self) -> dict[str, object]:
        return {
            "dataset": self.name,
            "counts": self.counts,
            "total": self.total,
            "images_per_s": round(self.images_per_s, 3),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
            "done": self.done,
            "unroutable": sum(self.unroutable.values()),
            "unroutable_reasons": self.unroutable,
            "unroutable_reasons_estimated": self.reasons_estimated,
            "recipes": self.recipes,
            "warnings": self.warnings,
            "pending_per_pool": self.pending_per_pool,
            "acceptance": None if self.acceptance is None else self.acceptance.as_dict(),
        }


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
        found = conn.execute(select(Dataset.id, Dataset.counts_ready).where(Dataset.name == name)).first()
        if found is None:
            raise UnknownDataset(f"no dataset named {name!r}")
        now = now or utcnow()
        return _status(conn, name, int(found.id), bool(found.counts_ready), now, read_backlog(conn, now))


def _status(
    conn: Connection, name: str, ds_id: int, counts_ready: bool, now: datetime, backlog: BacklogFigures | None
) -> DatasetStatus:
    """One dataset's status. Every query reads a bounded number of rows, whatever the dataset's size and the
    fleet's speed: the counts are job_counts' rows (a dataset not backfilled yet, see farm/store/counts.py, counts
    its jobs instead), the rate reads at most RATE_SAMPLE entries of ix_jobs_dataset_finished, the unroutable
    reasons at most REASON_SAMPLE jobs and only when the counts say there are unroutable jobs, and the recipes are
    a handful of rows."""
    stored = stored_counts(conn, ds_id) if counts_ready else counted_jobs(conn, ds_id)
    counts = {s.value: 0 for s in JobStatus}
    counts.update({key: n for key, n in stored.items() if key not in NOT_STATES})
    remaining = sum(counts[s.value] for s in (JobStatus.PENDING, JobStatus.QUEUED, JobStatus.RUNNING))
    rate = _rate(conn, ds_id, now, remaining)
    eta = remaining / rate if rate > 0 else (0.0 if remaining == 0 else None)
    reasons, estimated = _reasons(conn, ds_id, stored.get(UNROUTABLE, 0))
    recipes = conn.execute(
        select(func.count()).select_from(DatasetRecipe).where(DatasetRecipe.dataset_id == ds_id)
    ).scalar_one()
    per_pool = None if backlog is None else backlog.datasets.get(ds_id, {})
    target = conn.execute(select(Dataset.accept_target).where(Dataset.id == ds_id)).scalar() or 0
    acceptance = None
    if target or any(stored.get(key) for key in VERDICT_KEYS):
        acceptance = Acceptance(int(target), *(int(stored.get(key, 0)) for key in VERDICT_KEYS))
    return DatasetStatus(name, counts, rate, eta, reasons, estimated, int(recipes), per_pool, acceptance)


def _rate(conn: Connection, ds_id: int, now: datetime, remaining: int) -> float:
    """Images/s over the successes of the last RATE_WINDOW_S, the newest RATE_SAMPLE of them at most (one backward
    walk of ix_jobs_dataset_finished that stops there)."""
    newest = (
        select(Job.finished_at)
        .where(
            Job.dataset_id == ds_id,
            Job.finished_at >= now - timedelta(seconds=RATE_WINDOW_S),
            Job.status == JobStatus.SUCCEEDED.value,
        )
        .order_by(Job.finished_at.desc())
        .limit(RATE_SAMPLE)
        .subquery()
    )
    recent, first, last = conn.execute(
        select(func.count(), func.min(newest.c.finished_at), func.max(newest.c.finished_at))
    ).one()
    if not recent or first is None:
        return 0.0
    # While work remains the window runs to now (a stalled farm shows its rate falling); once everything is
    # finished it ends at the last image, so a finished run keeps its real rate.
    end = _aware(last, now) if remaining == 0 and last is not None else now
    span = max((end - _aware(first, now)).total_seconds(), 1.0)
    return float(recent) / span


def _reasons(conn: Connection, ds_id: int, unroutable: int) -> tuple[dict[str, int], bool]:
    """Reason → unroutable jobs, from at most REASON_SAMPLE of them; when there are more, each reason's share of the
    sample scaled to the exact total (largest remainders, so they add up to it), and True."""
    if unroutable <= 0:
        return {}, False
    notes = (
        select(Job.routing_note)
        .where(Job.dataset_id == ds_id, Job.status == JobStatus.PENDING.value, Job.routing_note.is_not(None))
        .limit(REASON_SAMPLE)
        .subquery()
    )
    rows = conn.execute(select(notes.c.routing_note, func.count()).group_by(notes.c.routing_note)).all()
    sample = {str(reason): int(n) for reason, n in rows}
    seen = sum(sample.values())
    if seen < REASON_SAMPLE or seen >= unroutable:
        return sample, False
    shares = {reason: n * unroutable / seen for reason, n in sample.items()}
    scaled = {reason: int(share) for reason, share in shares.items()}
    by_remainder = sorted(shares, key=lambda reason: shares[reason] - scaled[reason], reverse=True)
    for reason in by_remainder[: unroutable - sum(scaled.values())]:
        scaled[reason] += 1
    return scaled, True


def _aware(value: object, now: datetime) -> datetime:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=now.tzinfo)


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
    now = utcnow()
    with engine.connect() as conn:
        datasets = conn.execute(
            select(Dataset.id, Dataset.name, Dataset.counts_ready).order_by(Dataset.created_at, Dataset.id)
        ).all()
        backlog = read_backlog(conn, now)
        return [_status(conn, str(ds.name), int(ds.id), bool(ds.counts_ready), now, backlog) for ds in datasets]


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
