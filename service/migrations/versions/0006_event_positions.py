"""event positions: a gap-free order for the events API and live streams

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 21:50:00

``seq`` counts inserts. On PostgreSQL ``txid`` is the inserting transaction's
id, so a reader can tell which rows are final (see ``service/eventlog.py``); on
SQLite, whose single writer commits in insert order, it stays 0.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

POSTGRESQL = (
    "ALTER TABLE events ADD COLUMN seq BIGINT, ADD COLUMN txid BIGINT",
    """UPDATE events SET seq = o.n, txid = 0
      FROM (SELECT id, row_number() OVER (ORDER BY created_at, id) AS n FROM events) AS o
      WHERE events.id = o.id""",
    "CREATE SEQUENCE events_seq_seq OWNED BY events.seq",
    "SELECT setval('events_seq_seq', (SELECT coalesce(max(seq), 0) + 1 FROM events), false)",
    """ALTER TABLE events
      ALTER COLUMN seq SET DEFAULT nextval('events_seq_seq'),
      ALTER COLUMN txid SET DEFAULT (pg_current_xact_id()::text::bigint),
      ALTER COLUMN txid SET NOT NULL""",
)

SQLITE = (
    "ALTER TABLE events ADD COLUMN seq INTEGER",
    "ALTER TABLE events ADD COLUMN txid INTEGER NOT NULL DEFAULT 0",
    """UPDATE events SET seq = o.n
      FROM (SELECT id, row_number() OVER (ORDER BY created_at, id) AS n FROM events) AS o
      WHERE events.id = o.id""",
    # The single writer (BEGIN IMMEDIATE) makes max + 1 safe.
    """CREATE TRIGGER events_seq AFTER INSERT ON events FOR EACH ROW WHEN NEW.seq IS NULL
    BEGIN
      UPDATE events SET seq = (SELECT coalesce(max(seq), 0) + 1 FROM events)
      WHERE rowid = NEW.rowid;
    END""",
)


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    for statement in POSTGRESQL if postgresql else SQLITE:
        op.execute(sa.text(statement))
    op.create_index("ix_events_position", "events", ["txid", "seq"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_events_position", table_name="events")
    if op.get_bind().dialect.name == "sqlite":
        op.execute(sa.text("DROP TRIGGER events_seq"))
    # Plain ALTER TABLE on both engines: a batch copy of events would trip the
    # foreign keys of deliveries on SQLite.
    op.execute(sa.text("ALTER TABLE events DROP COLUMN txid"))
    op.execute(sa.text("ALTER TABLE events DROP COLUMN seq"))
