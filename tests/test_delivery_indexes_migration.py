"""Migration 0009: the index on ``deliveries.event_id`` the unique constraint made redundant."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from service.db import Database
from service.migrate import alembic_config, upgrade
from service.models import Base
from tests.test_event_less_deliveries_migration import ROWS_BEFORE
from tests.test_projects_migration import database_at

PREVIOUS = "0008"


def delivery_indexes(db: Database) -> set[str]:
    with db.engine.connect() as connection:
        return {index["name"] or "" for index in inspect(connection).get_indexes("deliveries")}


def test_the_event_id_index_goes_and_lookups_by_event_keep_their_index(
    stack_database_url: str,
) -> None:
    db = database_at(stack_database_url, PREVIOUS, ROWS_BEFORE)
    assert "ix_deliveries_event_id" in delivery_indexes(db)

    upgrade(db)

    assert "ix_deliveries_event_id" not in delivery_indexes(db)
    with db.engine.connect() as connection:
        constraints = inspect(connection).get_unique_constraints("deliveries")
        kept = connection.execute(text("SELECT id FROM deliveries")).scalars().all()
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    # What the dropped index did, the unique constraint's leading column still does.
    assert [c["column_names"] for c in constraints] == [["event_id", "subscription_id"]]
    assert kept == ["dlv_event"]

    command.downgrade(alembic_config(db), PREVIOUS)
    assert "ix_deliveries_event_id" in delivery_indexes(db)
    db.dispose()
