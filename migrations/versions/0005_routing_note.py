"""jobs.routing_note: why a pending job could not be routed to any live pool

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("routing_note", sa.Text(), nullable=True))


def downgrade() -> None:
    # Native DROP COLUMN (SQLite >= 3.35, PostgreSQL), not a batch rebuild of the table.
    op.execute("ALTER TABLE jobs DROP COLUMN routing_note")
