"""Where datasets stand (counts per state, images/s, ETA, unroutable reasons, acceptance), read from the job store
by plain SQL through a Reader: a SQLAlchemy connection (farm/store/queries.py) or, for the `farm status` command, a
bare DB-API connection (farm/store/quick.py), so that command answers without importing SQLAlchemy.

Every query reads a bounded number of rows, whatever the dataset's size and the fleet's speed: the counts are
job_counts' rows (kept by triggers, revision 0010; a dataset not backfilled yet counts its jobs instead), the
rate reads at most RATE_SAMPLE entries of ix_jobs_dataset_finished, the unroutable reasons at most REASON_SAMPLE
jobs and only when the counts say there are unroutable jobs, and the recipes are a handful of rows.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from farm.errors import UnknownDataset
from farm.store.states import FINISHED, JobStatus, utcnow

# Throughput is measured over the recent past, so a paused-then-resumed run shows its current speed: the last
# RATE_WINDOW_S, or the newest RATE_SAMPLE images when more than that many finished in it (a fleet at 1,000 images/s
# finishes 120,000 in the window; reading that many index entries would make `farm status` grow with the fleet).
RATE_WINDOW_S = 120
RATE_SAMPLE = 2048
# Why jobs are unroutable: read from at most this many of them (their total is exact, from job_counts); beyond it
# the per-reason figures are the sample's shares of the total (DatasetStatus.reasons_estimated).
REASON_SAMPLE = 10_000

# Pending jobs that carry a routing note (dispatch found no live pool for them): counted beside the states.
UNROUTABLE = "unroutable"
# Each verdict (revision 0011) is a key of its own too: jobs of yield-targeted lines, by what their rules said.
VERDICT_KEYS = ("accepted", "rejected", "duplicate", "unscored")
NOT_STATES = (UNROUTABLE, *VERDICT_KEYS)

# The control-table rows: the reaper and dispatcher duty, and the leader's pending-per-pool count (its note: JSON).
REAPER = "reaper"
BACKLOG = "backlog"
# A backlog count older than this many times its leader's spacing (and a minute) is not shown: nobody counts.
_STALE_AFTER = 3


@dataclass(frozen=True)
class Reader:
    """Runs one SQL statement with `:name` parameters and returns its rows, on SQLite or PostgreSQL."""

    dialect: str  # "sqlite" or "postgresql"
    run: Callable[[str, dict[str, Any]], Iterable[Sequence[Any]]]  # the driver's own paramstyle, as given

    def rows(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        if self.dialect == "postgresql":
            sql = _NAMED.sub(r"%(\1)s", sql)
        else:  # as SQLAlchemy stores a UTC timestamp on SQLite, so comparisons with stored text are right
            params = {k: _sqlite_moment(v) if isinstance(v, datetime) else v for k, v in params.items()}
        return [tuple(row) for row in self.run(sql, params)]


_NAMED = re.compile(r"(?<![:\w]):([a-z_]+)")


def connection_reader(conn: Any) -> Reader:
    """A Reader on a SQLAlchemy Connection (the statements go to its driver as they are)."""
    return Reader(conn.dialect.name, lambda sql, params: conn.exec_driver_sql(sql, params))


def _sqlite_moment(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def moment(value: Any) -> datetime | None:
    """A stored timestamp as an aware UTC datetime (SQLite returns text without a zone)."""
    if value is None:
        return None
    parsed = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


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
class BacklogFigures:
    """The last backlog count: pending jobs per pool (datasets not paused), per dataset id, and its age."""

    pools: dict[str, int]
    datasets: dict[int, dict[str, int]]
    age_s: float


def read_statuses(reader: Reader, name: str | None = None, *, now: datetime | None = None) -> list[DatasetStatus]:
    """The named dataset's status (UnknownDataset if there is none), or every dataset's, oldest first."""
    now = now or utcnow()
    columns = "SELECT id, name, counts_ready, accept_target FROM datasets"
    if name is None:
        datasets = reader.rows(f"{columns} ORDER BY created_at, id")
    else:
        datasets = reader.rows(f"{columns} WHERE name = :name", name=name)
        if not datasets:
            raise UnknownDataset(f"no dataset named {name!r}")
    backlog = read_backlog(reader, now)
    return [
        _status(reader, str(ds_name), int(ds_id), bool(ready), int(target or 0), now, backlog)
        for ds_id, ds_name, ready, target in datasets
    ]


def _status(
    reader: Reader,
    name: str,
    ds_id: int,
    counts_ready: bool,
    target: int,
    now: datetime,
    backlog: BacklogFigures | None,
) -> DatasetStatus:
    stored = stored_counts(reader, ds_id) if counts_ready else counted_jobs(reader, ds_id)
    counts = {s.value: 0 for s in JobStatus}
    counts.update({key: n for key, n in stored.items() if key not in NOT_STATES})
    remaining = sum(counts[s.value] for s in (JobStatus.PENDING, JobStatus.QUEUED, JobStatus.RUNNING))
    rate = _rate(reader, ds_id, now, remaining)
    eta = remaining / rate if rate > 0 else (0.0 if remaining == 0 else None)
    reasons, estimated = _reasons(reader, ds_id, stored.get(UNROUTABLE, 0))
    ((recipes,),) = reader.rows("SELECT count(*) FROM dataset_recipes WHERE dataset_id = :ds", ds=ds_id)
    per_pool = None if backlog is None else backlog.datasets.get(ds_id, {})
    acceptance = None
    if target or any(stored.get(key) for key in VERDICT_KEYS):
        acceptance = Acceptance(target, *(int(stored.get(key, 0)) for key in VERDICT_KEYS))
    return DatasetStatus(name, counts, rate, eta, reasons, estimated, int(recipes), per_pool, acceptance)


def stored_counts(reader: Reader, dataset_id: int) -> dict[str, int]:
    """What job_counts says: jobs per state (and UNROUTABLE, and each verdict), keys with a count of 0 left out."""
    rows = reader.rows("SELECT status, sum(n) FROM job_counts WHERE dataset_id = :ds GROUP BY status", ds=dataset_id)
    return {str(key): int(n) for key, n in rows if n}


def counted_jobs(reader: Reader, dataset_id: int) -> dict[str, int]:
    """The truth job_counts must equal: a GROUP BY over the dataset's jobs (reads all of them)."""
    rows = reader.rows("SELECT status, count(*) FROM jobs WHERE dataset_id = :ds GROUP BY status", ds=dataset_id)
    counts = {str(status): int(n) for status, n in rows}
    ((unroutable,),) = reader.rows(
        "SELECT count(*) FROM jobs WHERE dataset_id = :ds AND status = 'pending' AND routing_note IS NOT NULL",
        ds=dataset_id,
    )
    if unroutable:
        counts[UNROUTABLE] = int(unroutable)
    verdicts = reader.rows(
        "SELECT verdict, count(*) FROM jobs WHERE dataset_id = :ds AND verdict IS NOT NULL GROUP BY verdict",
        ds=dataset_id,
    )
    counts.update({str(verdict): int(n) for verdict, n in verdicts})
    return counts


def _rate(reader: Reader, ds_id: int, now: datetime, remaining: int) -> float:
    """Images/s over the successes of the last RATE_WINDOW_S, the newest RATE_SAMPLE of them at most (one backward
    walk of ix_jobs_dataset_finished that stops there)."""
    ((recent, first, last),) = reader.rows(
        "SELECT count(*), min(finished_at), max(finished_at) FROM ("
        " SELECT finished_at FROM jobs"
        " WHERE dataset_id = :ds AND finished_at >= :since AND status = 'succeeded'"
        " ORDER BY finished_at DESC LIMIT :sample) AS newest",
        ds=ds_id,
        since=now - timedelta(seconds=RATE_WINDOW_S),
        sample=RATE_SAMPLE,
    )
    first, last = moment(first), moment(last)
    if not recent or first is None:
        return 0.0
    # While work remains the window runs to now (a stalled farm shows its rate falling); once everything is
    # finished it ends at the last image, so a finished run keeps its real rate.
    end = last if remaining == 0 and last is not None else now
    span = max((end - first).total_seconds(), 1.0)
    return float(recent) / span


def _reasons(reader: Reader, ds_id: int, unroutable: int) -> tuple[dict[str, int], bool]:
    """Reason → unroutable jobs, from at most REASON_SAMPLE of them; when there are more, each reason's share of the
    sample scaled to the exact total (largest remainders, so they add up to it), and True."""
    if unroutable <= 0:
        return {}, False
    rows = reader.rows(
        "SELECT routing_note, count(*) FROM ("
        " SELECT routing_note FROM jobs"
        " WHERE dataset_id = :ds AND status = 'pending' AND routing_note IS NOT NULL LIMIT :sample) AS notes"
        " GROUP BY routing_note",
        ds=ds_id,
        sample=REASON_SAMPLE,
    )
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


def read_backlog(reader: Reader, now: datetime | None = None) -> BacklogFigures | None:
    """The stored backlog count; None when there is none, or when it is stale (no leader has counted lately)."""
    rows = reader.rows("SELECT last_run_at, note FROM control WHERE name = :name", name=BACKLOG)
    if not rows:
        return None
    last_run_at, note = moment(rows[0][0]), rows[0][1]
    if last_run_at is None or not note:
        return None
    try:
        figures: dict[str, Any] = json.loads(note)
        age = ((now or utcnow()) - last_run_at).total_seconds()
        if age > max(60.0, _STALE_AFTER * float(figures.get("every_s", 10.0))):
            return None
        datasets = {int(ds): {str(p): int(n) for p, n in per.items()} for ds, per in figures["datasets"].items()}
        return BacklogFigures({str(p): int(n) for p, n in figures["pools"].items()}, datasets, age)
    except (ValueError, KeyError, TypeError, AttributeError):  # written by another version: no figures
        return None


def interval_s(lease_s: float) -> float:
    """How often the control loop runs: a sixth of a lease, between 1 and 10 seconds."""
    return min(10.0, max(1.0, lease_s / 6))


def last_run(reader: Reader, duty: str = REAPER) -> tuple[str | None, datetime | None, str | None]:
    """(holder, last run, note) of a duty's control row; all None when no worker ever took it."""
    rows = reader.rows("SELECT holder, last_run_at, note FROM control WHERE name = :name", name=duty)
    if not rows:
        return None, None, None
    holder, ran_at, note = rows[0]
    return holder, moment(ran_at), note


def silence_warning(reader: Reader, lease_s: float, *, unfinished: bool) -> str | None:
    """A line for `farm status` / `farm workers` when the reaper has not run for a while and work is waiting."""
    if not unfinished:
        return None
    ran_at = last_run(reader)[1]
    silent = None if ran_at is None else (utcnow() - ran_at).total_seconds()
    if silent is not None and silent <= max(3 * interval_s(lease_s), 30.0):
        return None
    since = "has never run" if silent is None else f"has not run for {silent:.0f} s"
    return (
        f"warning: the reaper and dispatcher {since}: no `farm worker` is running, or none can reach the "
        "database; expired leases are not reaped and the broker's window is not topped up until one does"
    )
