"""job_counts: per-dataset counts per state, kept by triggers on jobs, so `farm status` does not count the jobs

The counts are kept by the database, not by Python: an AFTER INSERT / UPDATE / DELETE trigger on jobs adds each
change to job_counts in the transaction that made it. Every writer is counted the same way: the transitions, a
submit's INSERT … ON CONFLICT DO NOTHING (only rows really inserted), a dataset deleted with its jobs (CASCADE),
a bulk load by COPY, an operator's hand-written UPDATE, and a worker of the previous release still running while
this one rolls out.

- PostgreSQL: statement-level triggers with transition tables, so a statement that moves 5,000 jobs makes one
  grouped UPSERT (old states -1, new states +1), not 5,000. Each transaction adds into one stripe (0-15) of its
  own: farm_job_counts_stripe() takes the first free transaction-scoped advisory lock of 16, starting from the
  backend pid, and keeps it in a transaction-local setting. Concurrent transitions so write different rows and
  never wait for each other or deadlock on the counts. With 16 counting transactions in flight, a 17th shares
  its backend's stripe: its adds wait on that stripe's row locks (still exact; the rows are added in (dataset,
  state) order, and should two such transactions still meet in opposite orders over several statements,
  PostgreSQL's deadlock detector rolls one back whole, counts included).
- SQLite: row-level triggers doing the same UPSERT on stripe 0; SQLite has a single writer.

A key besides the six states: "unroutable", pending jobs with a routing note, so `farm status` looks for the
reasons only when there are some (that look-up reads every pending job of the dataset).

The backfill and its race. The counts must start from the jobs as they are, while transitions go on. Creating a
trigger on PostgreSQL takes a SHARE ROW EXCLUSIVE lock on jobs (it waits for running writers and blocks new ones)
that is held until this migration commits, and every migration of an upgrade runs in one transaction
(migrations/env.py). So this revision does not count a large jobs table inside it:

- SQLite, and a PostgreSQL store of at most farm.store.counts.INLINE_BACKFILL_MAX_JOBS jobs (200,000, counted
  with a bounded scan before any lock): one INSERT … SELECT … GROUP BY over jobs, after the triggers, in this
  transaction. No transition can run between the count and the switch to counting (the trigger's lock, or
  SQLite's single writer), so it is exact, and on PostgreSQL writers wait at most the few tens of ms it takes.
- A larger PostgreSQL store: the triggers count from this commit on, every dataset that has jobs is marked
  counts_ready = false (`farm status` counts its jobs with the GROUP BY, as before, until it is backfilled), and
  `farm db recount` backfills each dataset afterwards, one transaction each, without blocking writers:
  its one statement adds (jobs per state − job_counts per state), both read in the same snapshot, and sets
  counts_ready. A transition is in that snapshot for both tables or for neither (the trigger writes in its
  transaction), so the result is exact whatever runs meanwhile (farm/store/counts.py). Marking the datasets
  rather than counting in this transaction keeps the table lock to the length of the DDL.

Adding the column and the table takes no rewrite of jobs.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# 'jcnt': the advisory lock namespace of the 16 stripes (farm/dispatch/publish.py's dispatch lock is another key).
_STRIPE_LOCKS = 1784901236
_UPSERT = "ON CONFLICT (dataset_id, status, stripe) DO UPDATE SET n = job_counts.n + excluded.n"


def upgrade() -> None:
    from farm.store.counts import INLINE_BACKFILL_MAX_JOBS

    bind = op.get_bind()
    postgresql = bind.dialect.name == "postgresql"
    # Counted before taking any lock: a scan of at most the limit.
    small = (
        not postgresql
        or bind.execute(
            sa.text("SELECT count(*) FROM (SELECT 1 FROM jobs LIMIT :limit) AS j"),
            {"limit": INLINE_BACKFILL_MAX_JOBS + 1},
        ).scalar_one()
        <= INLINE_BACKFILL_MAX_JOBS
    )
    op.add_column("datasets", sa.Column("counts_ready", sa.Boolean(), nullable=False, server_default=sa.true()))
    op.create_table(
        "job_counts",
        sa.Column("dataset_id", sa.Integer(), sa.ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("status", sa.String(16), primary_key=True),
        sa.Column("stripe", sa.SmallInteger(), primary_key=True),
        sa.Column("n", sa.BigInteger(), nullable=False),
    )
    for statement in _postgresql_triggers() if postgresql else _sqlite_triggers():
        op.execute(sa.text(statement))
    if small:
        op.execute(
            sa.text(
                "INSERT INTO job_counts (dataset_id, status, stripe, n) "
                f"SELECT dataset_id, key, 0, count(*) FROM ({_keys('jobs', '1')}) AS k GROUP BY dataset_id, key"
            )
        )
    else:
        op.execute(
            sa.text(
                "UPDATE datasets SET counts_ready = false "
                "WHERE EXISTS (SELECT 1 FROM jobs WHERE dataset_id = datasets.id)"
            )
        )


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        for event in ("insert", "update", "delete", "truncate"):
            op.execute(f"DROP TRIGGER job_counts_{event} ON jobs")
        for function in ("inserted", "updated", "deleted", "truncated", "stripe"):
            op.execute(f"DROP FUNCTION farm_job_counts_{function}()")
    else:
        for trigger in ("insert", "update_status", "update_unroutable", "delete"):
            op.execute(f"DROP TRIGGER job_counts_{trigger}")
    op.drop_table("job_counts")
    op.execute("ALTER TABLE datasets DROP COLUMN counts_ready")


def _keys(rows: str, n: str) -> str:
    """(dataset_id, key, n) for each row of ``rows``: its state, and "unroutable" for a pending job with a note."""
    return (
        f"SELECT dataset_id, status AS key, {n} AS n FROM {rows} UNION ALL "
        f"SELECT dataset_id, 'unroutable', {n} FROM {rows} WHERE status = 'pending' AND routing_note IS NOT NULL"
    )


def _postgresql_triggers() -> list[str]:
    def add(keys: str, where: str = "") -> str:
        # One UPSERT per statement: the net change per (dataset, key), in key order, into this transaction's stripe.
        return f"""
            INSERT INTO job_counts (dataset_id, status, stripe, n)
            SELECT d.dataset_id, d.key, farm_job_counts_stripe(), d.n
            FROM (SELECT dataset_id, key, sum(n) AS n FROM ({keys}) AS k GROUP BY dataset_id, key) AS d
            WHERE d.n <> 0 {where}
            ORDER BY d.dataset_id, d.key
            {_UPSERT};"""

    def function(name: str, body: str) -> str:
        return f"""
            CREATE FUNCTION farm_job_counts_{name}() RETURNS trigger LANGUAGE plpgsql AS $body$
            BEGIN
                {body}
                RETURN NULL;
            END
            $body$"""

    return [
        f"""
        CREATE FUNCTION farm_job_counts_stripe() RETURNS smallint LANGUAGE plpgsql VOLATILE AS $body$
        DECLARE
            held text := current_setting('farm.job_counts_stripe', true);
            first integer := mod(pg_backend_pid(), 16);
            stripe integer;
        BEGIN
            IF held IS NOT NULL AND held <> '' THEN
                RETURN held::smallint;
            END IF;
            FOR k IN 0..15 LOOP
                stripe := mod(first + k, 16);
                IF pg_try_advisory_xact_lock({_STRIPE_LOCKS}, stripe) THEN
                    PERFORM set_config('farm.job_counts_stripe', stripe::text, true);
                    RETURN stripe;
                END IF;
            END LOOP;
            PERFORM set_config('farm.job_counts_stripe', first::text, true);
            RETURN first;
        END
        $body$""",
        function("inserted", add(_keys("new_rows", "1"))),
        function("updated", add(f"{_keys('old_rows', '-1')} UNION ALL {_keys('new_rows', '1')}")),
        # A dataset deleted with its jobs (CASCADE) is gone already: its counts go with it, nothing is added.
        function("deleted", add(_keys("old_rows", "-1"), "AND d.dataset_id IN (SELECT id FROM datasets)")),
        function("truncated", "DELETE FROM job_counts;"),
        "CREATE TRIGGER job_counts_insert AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION farm_job_counts_inserted()",
        "CREATE TRIGGER job_counts_update AFTER UPDATE ON jobs REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION farm_job_counts_updated()",
        "CREATE TRIGGER job_counts_delete AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION farm_job_counts_deleted()",
        "CREATE TRIGGER job_counts_truncate AFTER TRUNCATE ON jobs FOR EACH STATEMENT "
        "EXECUTE FUNCTION farm_job_counts_truncated()",
    ]


def _sqlite_triggers() -> list[str]:
    def add(dataset: str, key: str, n: int, when: str = "1") -> str:
        # `WHERE` lets SQLite parse the ON CONFLICT of an INSERT … SELECT.
        return (
            f"INSERT INTO job_counts (dataset_id, status, stripe, n) SELECT {dataset}, {key}, 0, {n} WHERE {when} "
            f"{_UPSERT};"
        )

    def unroutable(row: str) -> str:
        return f"({row}.status = 'pending' AND {row}.routing_note IS NOT NULL)"

    exists = "EXISTS (SELECT 1 FROM datasets WHERE id = OLD.dataset_id)"  # not when deleted with its dataset
    return [
        f"""
        CREATE TRIGGER job_counts_insert AFTER INSERT ON jobs BEGIN
            {add("NEW.dataset_id", "NEW.status", 1)}
            {add("NEW.dataset_id", "'unroutable'", 1, unroutable("NEW"))}
        END""",
        f"""
        CREATE TRIGGER job_counts_update_status AFTER UPDATE OF status, dataset_id ON jobs
        WHEN OLD.status IS NOT NEW.status OR OLD.dataset_id IS NOT NEW.dataset_id BEGIN
            {add("OLD.dataset_id", "OLD.status", -1)}
            {add("NEW.dataset_id", "NEW.status", 1)}
        END""",
        f"""
        CREATE TRIGGER job_counts_update_unroutable AFTER UPDATE OF status, routing_note, dataset_id ON jobs
        WHEN {unroutable("OLD")} IS NOT {unroutable("NEW")} OR OLD.dataset_id IS NOT NEW.dataset_id BEGIN
            {add("OLD.dataset_id", "'unroutable'", -1, unroutable("OLD"))}
            {add("NEW.dataset_id", "'unroutable'", 1, unroutable("NEW"))}
        END""",
        f"""
        CREATE TRIGGER job_counts_delete AFTER DELETE ON jobs BEGIN
            {add("OLD.dataset_id", "OLD.status", -1, exists)}
            {add("OLD.dataset_id", "'unroutable'", -1, f"{unroutable('OLD')} AND {exists}")}
        END""",
    ]
