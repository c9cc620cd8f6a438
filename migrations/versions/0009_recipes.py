"""Per-model samplers: negative prompts, HED preprocessing and timesteps as job inputs; each job's render recipe

jobs.negative_prompt, jobs.control_preprocess and jobs.timesteps are inputs (NULL unless a job uses them, so
older jobs keep their ids); jobs.recipe is written by the worker with the result. dataset_recipes holds each
distinct recipe a dataset was rendered with, so `farm status` can warn about a mix without reading the jobs.
Adding nullable columns takes no table rewrite on PostgreSQL or SQLite.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from farm.store.schema import UTCDateTime

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("negative_prompt", sa.Text()))
    op.add_column("jobs", sa.Column("control_preprocess", sa.String(80)))
    op.add_column("jobs", sa.Column("timesteps", sa.String(16)))
    op.add_column("jobs", sa.Column("recipe", sa.Text()))
    op.create_table(
        "dataset_recipes",
        sa.Column("dataset_id", sa.Integer(), sa.ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("recipe", sa.Text(), nullable=False),
        sa.Column("first_seen", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("dataset_recipes")
    for column in ("recipe", "timesteps", "control_preprocess", "negative_prompt"):
        op.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
