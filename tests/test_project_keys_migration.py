"""Migration 0007 on a database with a job at ModelsLab and a paused capacity row."""

from __future__ import annotations

from datetime import timedelta

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from service.capacity import claim_submits
from service.db import Database
from service.migrate import alembic_config, upgrade
from service.models import Base, utcnow
from tests.test_projects_migration import database_at

# The revision before per-project keys.
PREVIOUS = "0006"
T = "'2026-01-01 00:00:00'"
PAUSED = "'2999-01-01 00:00:00'"
ROWS_BEFORE = [
    # One job holds a slot at ModelsLab, one waits for a slot to submit.
    "INSERT INTO jobs (id, status, model_id, input, metadata, source_urls, outputs, created_at,"
    " updated_at, upstream_slot_since) VALUES ('job_out', 'processing', 'wan2.2', '{}', '{}',"
    f" '[]', '[]', {T}, {T}, {T})",
    "INSERT INTO jobs (id, status, model_id, input, metadata, source_urls, outputs, created_at,"
    f" updated_at) VALUES ('job_wait', 'queued', 'wan2.2', '{{}}', '{{}}', '[]', '[]', {T}, {T})",
    "INSERT INTO tasks (kind, job_id, due_at, attempts, created_at)"
    f" VALUES ('submit', 'job_wait', {T}, 0, {T})",
    f"UPDATE upstream_capacity SET effective_cap = 2, paused_until = {PAUSED}, probing = true",
]


@pytest.fixture
def old_database(stack_database_url: str) -> Database:
    return database_at(stack_database_url, PREVIOUS, ROWS_BEFORE)


def claim(db: Database) -> list[str]:
    with db.transaction() as session:
        claimed = claim_submits(
            session,
            db,
            owner="test",
            lease=60,
            limit=5,
            max_queued=5,
            now=utcnow() + timedelta(seconds=1),
        )
        return [task.job_id for task in claimed]


def test_existing_capacity_state_becomes_the_default_accounts(old_database: Database) -> None:
    upgrade(old_database)
    with old_database.engine.connect() as connection:
        rows = connection.execute(
            text("SELECT account, id, effective_cap, probing FROM upstream_capacity")
        ).all()
        assert [tuple(row) for row in rows] == [("default", 1, 2, True)]
        jobs = connection.execute(text("SELECT id, upstream_account FROM jobs ORDER BY id")).all()
        assert [tuple(row) for row in jobs] == [("job_out", "default"), ("job_wait", "default")]
        keys = connection.execute(
            text("SELECT modelslab_api_key, modelslab_account FROM projects")
        ).all()
        assert [tuple(row) for row in keys] == [(None, None)]
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []

    # The pause carried over holds the waiting job back; the slot held still counts.
    assert claim(old_database) == []
    with old_database.engine.begin() as connection:
        connection.execute(text("UPDATE upstream_capacity SET paused_until = NULL"))
    # Probing after the pause: one submission goes out, as before the upgrade.
    assert claim(old_database) == ["job_wait"]
    old_database.dispose()


def test_the_migration_downgrades_cleanly(old_database: Database) -> None:
    upgrade(old_database)
    command.downgrade(alembic_config(old_database), PREVIOUS)
    with old_database.engine.connect() as connection:
        names = {c["name"] for c in inspect(connection).get_columns("upstream_capacity")}
        assert "account" not in names
        jobs = {c["name"] for c in inspect(connection).get_columns("jobs")}
        assert "upstream_account" not in jobs
        row = connection.execute(text("SELECT id, effective_cap FROM upstream_capacity")).one()
        assert tuple(row) == (1, 2)
    old_database.dispose()
