"""Migration 0008 on a database with a delivery and its attempt: event-less deliveries."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from service.db import Database
from service.migrate import alembic_config, upgrade
from service.models import Base
from tests.test_projects_migration import database_at

# The revision before deliveries without an event.
PREVIOUS = "0007"
T = "'2026-01-01 00:00:00'"
ROWS_BEFORE = [
    "INSERT INTO jobs (id, status, model_id, input, metadata, source_urls, outputs, created_at,"
    f" updated_at) VALUES ('job_1', 'queued', 'wan2.2', '{{}}', '{{}}', '[]', '[]', {T}, {T})",
    "INSERT INTO events (id, type, job_id, created_at, payload)"
    f" VALUES ('evt_1', 'job.processing', 'job_1', {T}, '{{}}')",
    "INSERT INTO deliveries (id, event_id, job_id, kind, status, attempt_count, created_at,"
    f" updated_at) VALUES ('dlv_event', 'evt_1', 'job_1', 'discord_reply', 'delivered', 1, {T},"
    f" {T})",
    "INSERT INTO delivery_attempts (delivery_id, attempted_at, status_code, latency_ms, outcome)"
    f" VALUES ('dlv_event', {T}, 200, 1.5, 'delivered')",
]
EVENT_LESS = [
    "INSERT INTO deliveries (id, event_id, job_id, kind, status, attempt_count, created_at,"
    f" updated_at) VALUES ('dlv_queued', NULL, 'job_1', 'discord_reply', 'delivered', 1, {T},"
    f" {T})",
    "INSERT INTO delivery_attempts (delivery_id, attempted_at, status_code, latency_ms, outcome)"
    f" VALUES ('dlv_queued', {T}, 200, 2.5, 'delivered')",
]


@pytest.fixture
def old_database(stack_database_url: str) -> Database:
    return database_at(stack_database_url, PREVIOUS, ROWS_BEFORE)


def event_id_nullable(db: Database) -> bool:
    with db.engine.connect() as connection:
        columns = inspect(connection).get_columns("deliveries")
    return bool(next(c for c in columns if c["name"] == "event_id")["nullable"])


def attempts(db: Database) -> list[tuple[str, float]]:
    with db.engine.connect() as connection:
        rows = connection.execute(
            text("SELECT delivery_id, latency_ms FROM delivery_attempts ORDER BY delivery_id")
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]


def test_event_id_becomes_nullable_and_every_attempt_stays(old_database: Database) -> None:
    upgrade(old_database)
    assert event_id_nullable(old_database)
    # SQLite copies the table: its attempts must not go with the old one.
    assert attempts(old_database) == [("dlv_event", 1.5)]
    with old_database.engine.begin() as connection:
        for statement in EVENT_LESS:
            connection.execute(text(statement))
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    old_database.dispose()


def test_the_downgrade_deletes_event_less_deliveries_and_their_attempts(
    old_database: Database,
) -> None:
    upgrade(old_database)
    with old_database.engine.begin() as connection:
        for statement in EVENT_LESS:
            connection.execute(text(statement))
    command.downgrade(alembic_config(old_database), PREVIOUS)
    assert not event_id_nullable(old_database)
    with old_database.engine.connect() as connection:
        ids = connection.execute(text("SELECT id FROM deliveries")).scalars().all()
    assert ids == ["dlv_event"]
    assert attempts(old_database) == [("dlv_event", 1.5)]
    old_database.dispose()
