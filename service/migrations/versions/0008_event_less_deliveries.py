"""Deliveries without an event: the Discord "queued, position N" edit

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-09 02:00:00.000000

A Discord ``/animate`` that waits for a ModelsLab slot gets one chat-reply
delivery that edits its deferred answer to say where the job is in the queue.
There is no event for that (the event types are a public contract, streamed and
fanned out to subscriptions), so ``deliveries.event_id`` becomes nullable. The
downgrade deletes such deliveries, and their attempts, first.
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def _alter_event_id(*, nullable: bool) -> None:
    """Change ``deliveries.event_id``'s nullability, keeping every delivery attempt.

    On SQLite a batch copies ``deliveries`` and drops the old table, and dropping it
    cascade-deletes its attempts (foreign keys are on, and cannot be turned off
    inside the migration's transaction): they are kept aside meanwhile.
    """
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        op.execute("CREATE TEMPORARY TABLE attempts_0008 AS SELECT * FROM delivery_attempts")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.alter_column("event_id", existing_type=sa.String(length=40), nullable=nullable)
    if sqlite:
        op.execute("INSERT INTO delivery_attempts SELECT * FROM attempts_0008")
        op.execute("DROP TABLE attempts_0008")


def upgrade() -> None:
    _alter_event_id(nullable=True)


def downgrade() -> None:
    op.execute(
        "DELETE FROM delivery_attempts WHERE delivery_id IN"
        " (SELECT id FROM deliveries WHERE event_id IS NULL)"
    )
    op.execute("DELETE FROM deliveries WHERE event_id IS NULL")
    _alter_event_id(nullable=False)
