"""Migration 0003 on a database that already has rows: everything moves into ``default``."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from service import create_app
from service.db import Database
from service.migrate import upgrade
from service.models import Base
from tests.conftest import TOKEN, app_config

# The revision before the one that adds projects.
PREVIOUS = "0002"
OWNED_TABLES = ("jobs", "subscriptions", "events", "deliveries")
T = "'2026-01-01 00:00:00'"
ROWS_BEFORE = [
    "INSERT INTO jobs (id, status, model_id, input, metadata, source_urls, outputs,"
    " created_at, updated_at) VALUES ('job_old', 'failed', 'wan2.2',"
    f" '{{\"init_image\": \"https://example.com/a.png\"}}', '{{}}', '[]', '[]', {T}, {T})",
    "INSERT INTO subscriptions (id, kind, url, events, description, enabled, created_at,"
    " updated_at) VALUES ('sub_old', 'webhook', 'https://example.com/hook', '[]', '', true,"
    f" {T}, {T})",
    "INSERT INTO events (id, type, job_id, created_at, payload)"
    f" VALUES ('evt_old', 'job.failed', 'job_old', {T}, '{{}}')",
    "INSERT INTO deliveries (id, event_id, subscription_id, job_id, kind, status, attempt_count,"
    f" created_at, updated_at) VALUES ('dlv_old', 'evt_old', 'sub_old', 'job_old', 'webhook',"
    f" 'delivered', 1, {T}, {T})",
]


def database_at(url: str, revision: str, statements: list[str]) -> Database:
    """A database migrated up to ``revision``, with rows inserted by ``statements``."""
    db = Database(url)
    upgrade(db, revision)
    with db.engine.begin() as connection:
        for statement in statements:
            connection.execute(text(statement))
    return db


@pytest.fixture
def old_database(stack_database_url: str) -> Database:
    """A database one migration before projects, with a job, subscription, event and delivery."""
    return database_at(stack_database_url, PREVIOUS, ROWS_BEFORE)


def test_existing_rows_move_into_project_default(
    old_database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upgrade(old_database)
    with old_database.engine.connect() as connection:
        projects = connection.execute(text("SELECT id, name, secret FROM projects")).all()
        assert [tuple(row) for row in projects] == [("prj_default", "default", None)]
        for table in OWNED_TABLES:
            owners = connection.execute(text(f"SELECT project_id FROM {table}")).scalars().all()
            assert owners == ["prj_default"], table
            column = next(
                c for c in inspect(connection).get_columns(table) if c["name"] == "project_id"
            )
            assert column["nullable"] is False, table
            indexed = [ix["column_names"][0] for ix in inspect(connection).get_indexes(table)]
            assert "project_id" in indexed, table
        # Nothing was lost on the way (SQLite must not have copied and dropped tables).
        counts = {
            table: connection.execute(text(f"SELECT count(*) FROM {table}")).scalar()
            for table in OWNED_TABLES
        }
        assert counts == dict.fromkeys(OWNED_TABLES, 1)
        # The models and the migrated schema agree.
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    old_database.dispose()

    # The configured token, now project default's, still sees the old rows.
    monkeypatch.setenv("MOTIONHOOK_INSTANCE_PATH", str(tmp_path / "instance"))
    app = create_app(app_config(old_database.url, tmp_path))
    client = app.test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get("/v1/jobs/job_old", headers=auth).status_code == 200
    assert client.get("/v1/subscriptions/sub_old", headers=auth).status_code == 200
    assert client.get("/v1/deliveries/dlv_old", headers=auth).get_json()["status"] == "delivered"
    app.extensions["motionhook"].db.dispose()


def test_the_migration_downgrades_cleanly(old_database: Database) -> None:
    from alembic import command

    from service.migrate import alembic_config

    upgrade(old_database)
    command.downgrade(alembic_config(old_database), PREVIOUS)
    with old_database.engine.connect() as connection:
        assert not inspect(connection).has_table("projects")
        for table in OWNED_TABLES:
            names = [c["name"] for c in inspect(connection).get_columns(table)]
            assert "project_id" not in names, table
        assert connection.execute(text("SELECT count(*) FROM deliveries")).scalar() == 1
    old_database.dispose()
