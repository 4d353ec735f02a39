"""projects and tokens: every job, subscription, event and delivery belongs to a project

Creates project ``default`` and moves every existing row into it (the column's
server default fills them; PostgreSQL does it without rewriting the table).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 10:00:00
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

DEFAULT_PROJECT_ID = "prj_default"
# Table, and the columns after project_id of its project index.
OWNED = {
    "jobs": ("created_at", "id"),
    "subscriptions": (),
    "events": (),
    "deliveries": ("created_at", "id"),
}


def _index_name(table: str, extra: tuple[str, ...]) -> str:
    return f"ix_{table}_project_created" if extra else f"ix_{table}_project_id"


def upgrade() -> None:
    projects = op.create_table(
        "projects",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("secret", sa.Text(), nullable=True),
        sa.Column("previous_secret", sa.Text(), nullable=True),
        sa.Column("previous_secret_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_projects")),
        sa.UniqueConstraint("name", name=op.f("uq_projects_name")),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("project_id", sa.String(length=40), nullable=False),
        sa.Column("scope", sa.String(length=8), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_api_tokens_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    op.create_index(op.f("ix_api_tokens_project_id"), "api_tokens", ["project_id"], unique=False)

    now = datetime.now(UTC)
    if op.get_bind().dialect.name == "sqlite":
        now = now.replace(tzinfo=None)  # as the models' UTCDateTime stores it there
    # secret NULL: ``default`` signs with MOTIONHOOK_WEBHOOK_SECRET, as before.
    op.bulk_insert(
        projects,
        [{"id": DEFAULT_PROJECT_ID, "name": "default", "created_at": now, "updated_at": now}],
    )

    # A plain ADD COLUMN, not a batch: on SQLite a batch copies and drops the table,
    # and dropping ``subscriptions`` would cascade-delete every delivery.
    for table, extra in OWNED.items():
        op.add_column(
            table,
            sa.Column(
                "project_id",
                sa.String(length=40),
                server_default=DEFAULT_PROJECT_ID,
                nullable=False,
            ),
        )
        op.create_index(_index_name(table, extra), table, ["project_id", *extra], unique=False)


def downgrade() -> None:
    for table, extra in OWNED.items():
        op.drop_index(_index_name(table, extra), table_name=table)
        op.drop_column(table, "project_id")
    op.drop_index(op.f("ix_api_tokens_project_id"), table_name="api_tokens")
    op.drop_table("api_tokens")
    op.drop_table("projects")
