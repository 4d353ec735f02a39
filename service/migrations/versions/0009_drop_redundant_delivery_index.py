"""Drop ``ix_deliveries_event_id``: ``uq_delivery_target`` already leads with ``event_id``

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 06:00:00.000000

Every delivery row is updated twice (claimed, settled), and neither update can be
a heap-only one, so each writes an entry into every index of the table: an index
that no query needs costs fan-out throughput. Lookups by event use the unique
constraint on ``(event_id, subscription_id)``.
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Not a batch: SQLite drops an index in place (a batch could copy the table).
    op.drop_index("ix_deliveries_event_id", table_name="deliveries")


def downgrade() -> None:
    op.create_index("ix_deliveries_event_id", "deliveries", ["event_id"], unique=False)
