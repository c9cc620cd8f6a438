"""controlnet, condition image and quantization columns on jobs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_COLUMNS = ("controlnet", "conditioning_scale", "control_sha256", "control_uri", "quantize")


def upgrade() -> None:
    # Nullable columns only: existing jobs stay valid as plain (uncontrolled, unquantized) jobs.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("controlnet", sa.String(512), nullable=True))
        batch.add_column(sa.Column("conditioning_scale", sa.Float(), nullable=True))
        batch.add_column(sa.Column("control_sha256", sa.String(64), nullable=True))
        batch.add_column(sa.Column("control_uri", sa.Text(), nullable=True))
        batch.add_column(sa.Column("quantize", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for name in reversed(_COLUMNS):
            batch.drop_column(name)
