"""Per-project ModelsLab keys, and capacity state per ModelsLab account

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 02:00:00.000000

A project may bring its own ModelsLab key (``projects.modelslab_api_key``); its
jobs then count against that account's queued-request cap, named by
``projects.modelslab_account``, instead of the instance's (``default``). The one
row of ``upstream_capacity`` becomes the ``default`` account's row; ``id`` stays
(no longer the key, 1 on that row) for the workers of the previous release, which
still lock ``id = 1`` during a rolling deploy and submit with the instance key.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.add_column(sa.Column("modelslab_api_key", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("modelslab_account", sa.String(length=40), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "upstream_account",
                sa.String(length=40),
                server_default="default",
                nullable=False,
            )
        )
    with op.batch_alter_table("upstream_capacity", schema=None, recreate="always") as batch_op:
        batch_op.add_column(
            sa.Column("account", sa.String(length=40), server_default="default", nullable=False)
        )
        batch_op.drop_constraint("pk_upstream_capacity", type_="primary")
        batch_op.alter_column("id", existing_type=sa.Integer(), nullable=True, autoincrement=False)
        batch_op.create_primary_key("pk_upstream_capacity", ["account"])


def downgrade() -> None:
    op.execute("DELETE FROM upstream_capacity WHERE account <> 'default'")
    with op.batch_alter_table("upstream_capacity", schema=None, recreate="always") as batch_op:
        batch_op.drop_constraint("pk_upstream_capacity", type_="primary")
        batch_op.drop_column("account")
        batch_op.alter_column("id", existing_type=sa.Integer(), nullable=False)
        batch_op.create_primary_key("pk_upstream_capacity", ["id"])
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("upstream_account")
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.drop_column("modelslab_account")
        batch_op.drop_column("modelslab_api_key")
