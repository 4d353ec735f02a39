"""drop jobs.submit_attempts (written, never read: a task counts its own attempts)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 21:50:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("submit_attempts")


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("submit_attempts", sa.Integer(), nullable=False, server_default="0")
        )
