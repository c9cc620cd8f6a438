"""jobs.source_file: the prompt file (or `<prompts>` for a Python list) a job's line came from

Several files can go into one dataset; with the file beside the line, `farm jobs` shows `file:line` and the
numbers no longer collide.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("source_file", sa.Text()))


def downgrade() -> None:
    op.execute("ALTER TABLE jobs DROP COLUMN source_file")
