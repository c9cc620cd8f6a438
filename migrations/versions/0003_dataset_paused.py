"""datasets.paused: `farm pause` / `farm resume`

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN, not batch mode: on SQLite batch mode rebuilds the table, and dropping the old
    # `datasets` with foreign keys on would cascade-delete every job (tests/test_db.py guards this).
    op.add_column("datasets", sa.Column("paused", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    # Native DROP COLUMN (SQLite ≥ 3.35, PostgreSQL): batch mode would rebuild `datasets` and cascade.
    op.execute("ALTER TABLE datasets DROP COLUMN paused")
