"""Yield-targeted datasets: scores and a verdict on each job, the lines' rules, embeddings, verdict counts

jobs gains the scorer a job is scored with, its line and try, the scores, the pixels' hash and the verdict
(NULL for every existing job: nothing changes for them). acceptance_lines holds each yield-targeted line's rules
and where its try-order decisions stand; job_embeddings the float16 CLIP embeddings; datasets.accept_target the
accepted images a dataset's lines want in all (farm/store/verdicts.py).

job_counts also counts verdicts: the triggers of revision 0010 are replaced by ones that add a key per verdict
(accepted, rejected, duplicate, unscored) beside the states, so `farm status` reads acceptance figures without
counting jobs. Every existing job has no verdict, so the counts need no backfill.

The new index on (line_id, try_index) is partial (line_id IS NOT NULL): it holds only jobs of yield-targeted
lines. Building it reads the jobs table once under a lock that blocks writers for that scan (seconds per 10M
jobs); adding nullable columns rewrites nothing.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_UPSERT = "ON CONFLICT (dataset_id, status, stripe) DO UPDATE SET n = job_counts.n + excluded.n"
_COLUMNS = (
    ("scorer", sa.String(64)),
    ("line_id", sa.String(32)),
    ("try_index", sa.Integer()),
    ("clip_score", sa.Float()),
    ("aesthetic_score", sa.Float()),
    ("nsfw", sa.Boolean()),
    ("pixel_sha256", sa.String(64)),
    ("scored_by", sa.Text()),
    ("verdict", sa.String(16)),
    ("verdict_reason", sa.Text()),
)


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    for name, kind in _COLUMNS:
        op.add_column("jobs", sa.Column(name, kind))
    op.add_column("datasets", sa.Column("accept_target", sa.BigInteger(), nullable=False, server_default="0"))
    op.create_index(
        "ix_jobs_line_try",
        "jobs",
        ["line_id", "try_index"],
        postgresql_where=sa.text("line_id IS NOT NULL"),
        sqlite_where=sa.text("line_id IS NOT NULL"),
    )
    op.create_table(
        "acceptance_lines",
        sa.Column("line_id", sa.String(32), primary_key=True),
        sa.Column("dataset_id", sa.Integer(), sa.ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False),
        sa.Column("rules", sa.Text(), nullable=False),
        sa.Column("base_seed", sa.BigInteger(), nullable=False),
        sa.Column("occurrence", sa.Integer(), nullable=False),
        sa.Column("accept", sa.Integer(), nullable=False),
        sa.Column("max_tries", sa.Integer(), nullable=False),
        sa.Column("tries", sa.Integer(), nullable=False),
        sa.Column("decided", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("accepted", sa.Integer(), nullable=False, server_default="0"),
    )
    op.create_index("ix_acceptance_lines_dataset_id", "acceptance_lines", ["dataset_id"])
    op.create_table(
        "job_embeddings",
        sa.Column("job_id", sa.String(32), primary_key=True),
        sa.Column("dataset_id", sa.Integer(), sa.ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False),
        sa.Column("model", sa.String(512), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
    )
    op.create_index("ix_job_embeddings_dataset_id", "job_embeddings", ["dataset_id"])
    if postgresql:
        for statement in _postgresql_functions(with_verdicts=True):
            op.execute(sa.text(statement))
    else:
        op.execute("DROP TRIGGER job_counts_insert")
        op.execute("DROP TRIGGER job_counts_delete")
        for statement in _sqlite_triggers():
            op.execute(sa.text(statement))


def downgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    if postgresql:
        for statement in _postgresql_functions(with_verdicts=False):
            op.execute(sa.text(statement))
    else:
        for trigger in ("insert", "delete", "update_verdict"):
            op.execute(f"DROP TRIGGER job_counts_{trigger}")
        for statement in _sqlite_triggers(with_verdicts=False):
            op.execute(sa.text(statement))
    op.execute("DELETE FROM job_counts WHERE status IN ('accepted', 'rejected', 'duplicate', 'unscored')")
    op.drop_table("job_embeddings")
    op.drop_table("acceptance_lines")
    op.drop_index("ix_jobs_line_try", "jobs")
    op.execute("ALTER TABLE datasets DROP COLUMN accept_target")
    for name, _kind in reversed(_COLUMNS):
        op.execute(f"ALTER TABLE jobs DROP COLUMN {name}")


def _keys(rows: str, n: str, with_verdicts: bool = True) -> str:
    """(dataset_id, key, n) for each row: its state, "unroutable" for a pending job with a note, its verdict.

    With verdicts, one scan of the rows gives all three keys (a LATERAL VALUES), where revision 0010 scanned them
    once per key: a 100k-job submit's insert trigger reads its transition table once."""
    if not with_verdicts:
        return (
            f"SELECT dataset_id, status AS key, {n} AS n FROM {rows} UNION ALL "
            f"SELECT dataset_id, 'unroutable', {n} FROM {rows} WHERE status = 'pending' AND routing_note IS NOT NULL"
        )
    return (
        f"SELECT r.dataset_id, k.key, {n} AS n FROM {rows} AS r CROSS JOIN LATERAL (VALUES (r.status), "
        "(CASE WHEN r.status = 'pending' AND r.routing_note IS NOT NULL THEN 'unroutable' END), "
        "(r.verdict)) AS k(key) WHERE k.key IS NOT NULL"
    )


def _postgresql_functions(with_verdicts: bool) -> list[str]:
    """Revision 0010's trigger functions, replaced in place (the triggers call them by name)."""

    def add(keys: str, where: str = "") -> str:
        return f"""
            INSERT INTO job_counts (dataset_id, status, stripe, n)
            SELECT d.dataset_id, d.key, farm_job_counts_stripe(), d.n
            FROM (SELECT dataset_id, key, sum(n) AS n FROM ({keys}) AS k GROUP BY dataset_id, key) AS d
            WHERE d.n <> 0 {where}
            ORDER BY d.dataset_id, d.key
            {_UPSERT};"""

    def function(name: str, body: str) -> str:
        return f"""
            CREATE OR REPLACE FUNCTION farm_job_counts_{name}() RETURNS trigger LANGUAGE plpgsql AS $body$
            BEGIN
                {body}
                RETURN NULL;
            END
            $body$"""

    v = with_verdicts
    return [
        function("inserted", add(_keys("new_rows", "1", v))),
        function("updated", add(f"{_keys('old_rows', '-1', v)} UNION ALL {_keys('new_rows', '1', v)}")),
        function("deleted", add(_keys("old_rows", "-1", v), "AND d.dataset_id IN (SELECT id FROM datasets)")),
    ]


def _sqlite_triggers(with_verdicts: bool = True) -> list[str]:
    def add(dataset: str, key: str, n: int, when: str = "1") -> str:
        return (
            f"INSERT INTO job_counts (dataset_id, status, stripe, n) SELECT {dataset}, {key}, 0, {n} WHERE {when} "
            f"{_UPSERT};"
        )

    def unroutable(row: str) -> str:
        return f"({row}.status = 'pending' AND {row}.routing_note IS NOT NULL)"

    def verdict(row: str, dataset: str, n: int, when: str = "1") -> str:
        return add(dataset, f"{row}.verdict", n, f"{row}.verdict IS NOT NULL AND {when}") if with_verdicts else ""

    exists = "EXISTS (SELECT 1 FROM datasets WHERE id = OLD.dataset_id)"
    triggers = [
        f"""
        CREATE TRIGGER job_counts_insert AFTER INSERT ON jobs BEGIN
            {add("NEW.dataset_id", "NEW.status", 1)}
            {add("NEW.dataset_id", "'unroutable'", 1, unroutable("NEW"))}
            {verdict("NEW", "NEW.dataset_id", 1)}
        END""",
        f"""
        CREATE TRIGGER job_counts_delete AFTER DELETE ON jobs BEGIN
            {add("OLD.dataset_id", "OLD.status", -1, exists)}
            {add("OLD.dataset_id", "'unroutable'", -1, f"{unroutable('OLD')} AND {exists}")}
            {verdict("OLD", "OLD.dataset_id", -1, exists)}
        END""",
    ]
    if with_verdicts:
        triggers.append(
            f"""
            CREATE TRIGGER job_counts_update_verdict AFTER UPDATE OF verdict, dataset_id ON jobs
            WHEN OLD.verdict IS NOT NEW.verdict OR OLD.dataset_id IS NOT NEW.dataset_id BEGIN
                {verdict("OLD", "OLD.dataset_id", -1)}
                {verdict("NEW", "NEW.dataset_id", 1)}
            END"""
        )
    return triggers
