"""ModelsLab capacity: the slot a job holds, and the shared capacity state

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 22:10:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("upstream_slot_since", sa.DateTime(timezone=True)))
        batch_op.create_index(batch_op.f("ix_jobs_upstream_slot_since"), ["upstream_slot_since"])
    op.create_table(
        "upstream_capacity",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("effective_cap", sa.Integer(), nullable=True),
        sa.Column("paused_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("probing", sa.Boolean(), nullable=False),
        sa.Column("probe_job_id", sa.String(length=40), nullable=True),
        sa.Column("probe_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_upstream_capacity")),
    )
    op.execute(
        "INSERT INTO upstream_capacity (id, probing, updated_at) VALUES (1, false, CURRENT_TIMESTAMP)"
    )
    # Jobs already at ModelsLab when this release starts hold their slots.
    op.execute(
        "UPDATE jobs SET upstream_slot_since = submitted_at "
        "WHERE status = 'processing' AND upstream_status = 'processing'"
    )


def downgrade() -> None:
    op.drop_table("upstream_capacity")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_upstream_slot_since"))
        batch_op.drop_column("upstream_slot_since")
