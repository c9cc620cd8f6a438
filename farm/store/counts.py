"""Per-dataset job counts per state (job_counts): read by `farm status`, rebuilt by `farm db recount`.

The database keeps them: triggers on jobs (migrations/versions/0010_status_counts.py) add every insert, state
change and delete to job_counts in the transaction that makes it, so no transition in farm/store/transitions.py,
farm/submit/record.py or anywhere else has to remember to. A dataset's count of a state is the sum of its rows
over the stripes (at most 16 per state): concurrent transactions on PostgreSQL add to different stripes.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, text, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection, Engine

from farm.errors import UnknownDataset
from farm.store import progress
from farm.store.progress import NOT_STATES as NOT_STATES
from farm.store.progress import UNROUTABLE as UNROUTABLE
from farm.store.progress import VERDICT_KEYS as VERDICT_KEYS
from farm.store.schema import Dataset, JobCount

# Migration 0010 backfills a PostgreSQL store of up to this many jobs in its own transaction (tens of ms under
# the trigger's table lock); a larger one is backfilled by `farm db recount`, without blocking writers.
INLINE_BACKFILL_MAX_JOBS = 200_000


def stored_counts(conn: Connection, dataset_id: int) -> dict[str, int]:
    """What job_counts says: jobs per state (and UNROUTABLE, and each verdict), keys with a count of 0 left out."""
    return progress.stored_counts(progress.connection_reader(conn), dataset_id)


def counted_jobs(conn: Connection, dataset_id: int) -> dict[str, int]:
    """The truth job_counts must equal: a GROUP BY over the dataset's jobs (reads all of them)."""
    return progress.counted_jobs(progress.connection_reader(conn), dataset_id)


@dataclass(frozen=True)
class Recounted:
    """What `farm db recount` found for one dataset."""

    dataset: str
    counts: dict[str, int]  # per state (and UNROUTABLE), as rebuilt
    changes: dict[str, int]  # what was added to each stored count to make it right (0s left out)

    def describe(self) -> str:
        total = sum(n for key, n in self.counts.items() if key not in NOT_STATES)
        if not self.changes:
            return f"{self.dataset}: {total} jobs, counts were right"
        fixed = ", ".join(f"{key} {n:+d}" for key, n in sorted(self.changes.items()))
        return f"{self.dataset}: {total} jobs, fixed {fixed}"


def recount(engine: Engine, name: str | None = None) -> list[Recounted]:
    """Rebuild job_counts from the jobs table, for one dataset or every one (oldest first), one transaction each.

    Exact while transitions go on, and blocking none of them: see _recount. Marks each dataset counts_ready.
    """
    with engine.connect() as conn:
        query = select(Dataset.id, Dataset.name).order_by(Dataset.created_at, Dataset.id)
        if name is not None:
            query = query.where(Dataset.name == name)
        datasets = [(int(ds_id), str(ds_name)) for ds_id, ds_name in conn.execute(query)]
    if name is not None and not datasets:
        raise UnknownDataset(f"no dataset named {name!r}")
    done = []
    for ds_id, ds_name in datasets:
        with engine.begin() as conn:
            changes = _recount(conn, ds_id)
            done.append(Recounted(ds_name, stored_counts(conn, ds_id), changes))
    return done


_PG_RECOUNT = text(
    """
    WITH delta AS MATERIALIZED (
        SELECT key, sum(n) AS n FROM (
            SELECT status AS key, count(*) AS n FROM jobs WHERE dataset_id = :ds GROUP BY status
            UNION ALL
            SELECT 'unroutable', count(*) FROM jobs
            WHERE dataset_id = :ds AND status = 'pending' AND routing_note IS NOT NULL
            UNION ALL
            SELECT verdict, count(*) FROM jobs WHERE dataset_id = :ds AND verdict IS NOT NULL GROUP BY verdict
            UNION ALL
            SELECT status, -sum(n) FROM job_counts WHERE dataset_id = :ds GROUP BY status
        ) AS k GROUP BY key HAVING sum(n) <> 0
    ), added AS (
        INSERT INTO job_counts (dataset_id, status, stripe, n)
        SELECT :ds, key, farm_job_counts_stripe(), n FROM delta ORDER BY key
        ON CONFLICT (dataset_id, status, stripe) DO UPDATE SET n = job_counts.n + excluded.n
        RETURNING 1
    )
    SELECT key, n FROM delta
    """
)


def _recount(conn: Connection, dataset_id: int) -> dict[str, int]:
    """Add (jobs per state − stored count) to each count of the dataset; returns what was added.

    PostgreSQL: one statement, so the jobs and job_counts are read in one snapshot. A transition committed before
    it is in both (its trigger wrote in its transaction), one committed after in neither and adds its own change
    on top; so the sum comes out exact with no lock, and the add goes into this transaction's stripe like any
    other (the rows' own locks order it with concurrent adds). SQLite: the first statement takes the single
    writer's lock, so nothing changes between reading and writing.
    """
    if conn.dialect.name == "postgresql":
        changes = {str(key): int(n) for key, n in conn.execute(_PG_RECOUNT, {"ds": dataset_id})}
        conn.execute(update(Dataset).where(Dataset.id == dataset_id).values(counts_ready=True))
        return changes
    conn.execute(update(Dataset).where(Dataset.id == dataset_id).values(counts_ready=True))
    truth, stored = counted_jobs(conn, dataset_id), stored_counts(conn, dataset_id)
    changes = {key: truth.get(key, 0) - stored.get(key, 0) for key in truth.keys() | stored.keys()}
    changes = {key: n for key, n in changes.items() if n}
    for key, n in changes.items():
        add = sqlite.insert(JobCount).values(dataset_id=dataset_id, status=key, stripe=0, n=n)
        keys = [JobCount.dataset_id, JobCount.status, JobCount.stripe]
        conn.execute(add.on_conflict_do_update(index_elements=keys, set_={"n": JobCount.n + add.excluded.n}))
    return changes
