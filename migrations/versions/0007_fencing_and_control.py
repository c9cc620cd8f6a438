"""jobs.claim_seq, queue and queued_at; the control table (leader lease of the reaper and dispatcher)

claim_seq is each job's fencing token: it grows by one on every claim and never resets. queue and queued_at say
where and when a job was last sent to the broker, so the dispatcher keeps a bounded window per queue and sends
again what was not claimed in time.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from farm.store.schema import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMNs: batch mode would rebuild `jobs` on SQLite. A job claimed before this revision keeps its
    # attempts as its sequence, so its first fenced claim is still above every earlier one.
    op.add_column("jobs", sa.Column("claim_seq", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("queue", sa.String(255)))
    op.add_column("jobs", sa.Column("queued_at", UTCDateTime()))
    op.execute("UPDATE jobs SET claim_seq = attempts WHERE attempts > 0")
    op.create_index("ix_jobs_status_queued", "jobs", ["status", "queue", "queued_at"])
    op.create_table(
        "control",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(255)),
        sa.Column("expires_at", UTCDateTime()),
        sa.Column("last_run_at", UTCDateTime()),
        sa.Column("note", sa.Text()),
    )


def downgrade() -> None:
    op.drop_table("control")
    op.drop_index("ix_jobs_status_queued", "jobs")
    for column in ("queued_at", "queue", "claim_seq"):
        op.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
