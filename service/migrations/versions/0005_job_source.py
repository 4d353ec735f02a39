"""Chat jobs: where a job was asked for (Slack or Discord)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 23:10:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("source", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("chat_reply", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("chat_reply")
        batch_op.drop_column("source")
