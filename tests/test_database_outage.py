"""Web while the database is away: 503 with Retry-After on every endpoint, logged once.

The outages here are real: a PostgreSQL URL whose port nobody listens on (connection
refused), and a SQLite file whose write lock another connection holds (``database
is locked``). Errors that are bugs (a missing table, a broken constraint) must stay
500s. The crash of a running server, with worker and deliveries, is in
``test_e2e_outage.py``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import QueuePool

from service import create_app
from service.api.errors import DATABASE_UNAVAILABLE, RETRY_AFTER_SECONDS
from service.callbacks import callback_token
from service.db import database_unavailable
from service.devstack import free_port
from tests.conftest import CALLBACK_SECRET, TOKEN, app_config

AUTH = {"Authorization": f"Bearer {TOKEN}"}
OUTAGE_WARNING = "database unavailable; answering 503 until it answers again"
TRACK_ID = "job_outage0000000000000000001"


def every_endpoint(client: FlaskClient) -> dict[str, Any]:
    """One request to each endpoint family that reads or writes the database."""
    sig = callback_token(CALLBACK_SECRET, TRACK_ID)
    return {
        "create job": client.post(
            "/v1/jobs", json={"init_image": "https://example.com/a.png"}, headers=AUTH
        ),
        "get job": client.get(f"/v1/jobs/{TRACK_ID}", headers=AUTH),
        "list jobs": client.get("/v1/jobs", headers=AUTH),
        "callback": client.post(
            f"/v1/callbacks/modelslab/{TRACK_ID}?sig={sig}",
            json={"status": "success", "id": 1, "output": [], "track_id": TRACK_ID},
        ),
        "create subscription": client.post(
            "/v1/subscriptions",
            json={"kind": "webhook", "url": "http://127.0.0.1:9/hook"},
            headers=AUTH,
        ),
        "list subscriptions": client.get("/v1/subscriptions", headers=AUTH),
        "list deliveries": client.get("/v1/deliveries", headers=AUTH),
    }


def assert_unavailable(response: Any, name: str) -> None:
    assert response.status_code == 503, f"{name}: {response.status_code} {response.data!r}"
    assert response.get_json() == {
        "code": 503,
        "status": "Service Unavailable",
        "message": DATABASE_UNAVAILABLE,
    }, name
    assert response.headers["Retry-After"] == str(RETRY_AFTER_SECONDS), name


def outage_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == OUTAGE_WARNING]


@pytest.fixture
def refused_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Flask]:
    """The app on a PostgreSQL URL whose port nobody listens on."""
    monkeypatch.setenv("MOTIONHOOK_INSTANCE_PATH", str(tmp_path / "instance"))
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/motionhook"
    config = app_config(url, tmp_path, CALLBACK_SECRET=CALLBACK_SECRET, ALLOW_PRIVATE_TARGETS=True)
    flask_app = create_app(config)
    yield flask_app
    flask_app.extensions["motionhook"].db.dispose()


def test_every_endpoint_answers_503_when_postgresql_refuses(
    refused_app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    client = refused_app.test_client()
    for name, response in every_endpoint(client).items():
        assert_unavailable(response, name)
    assert client.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200
    assert len(outage_warnings(caplog)) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.fixture
def sqlite_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Flask]:
    """The app on migrated SQLite whose connections give up at once on a held lock."""
    from service.migrate import upgrade

    monkeypatch.setenv("MOTIONHOOK_INSTANCE_PATH", str(tmp_path / "instance"))
    flask_app = create_app(
        app_config(
            f"sqlite:///{tmp_path / 'locked.db'}",
            tmp_path,
            CALLBACK_SECRET=CALLBACK_SECRET,
            ALLOW_PRIVATE_TARGETS=True,
        )
    )
    db = flask_app.extensions["motionhook"].db
    upgrade(db)

    @event.listens_for(db.engine, "connect")
    def _no_busy_wait(dbapi_connection: Any, _record: Any) -> None:
        # After the service's own 30 s busy_timeout: a held lock fails the request now.
        dbapi_connection.execute("PRAGMA busy_timeout=0")

    db.engine.dispose()
    yield flask_app
    db.dispose()


@pytest.fixture
def hold_lock(tmp_path: Path) -> Iterator[Callable[[], sqlite3.Connection]]:
    """Take SQLite's write lock from another connection, as a second writer would."""
    held: list[sqlite3.Connection] = []

    def take() -> sqlite3.Connection:
        connection = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
        connection.execute("BEGIN IMMEDIATE")
        held.append(connection)
        return connection

    yield take
    for connection in held:
        connection.close()


def test_locked_sqlite_answers_503_and_logs_once_per_outage(
    sqlite_app: Flask,
    hold_lock: Callable[[], sqlite3.Connection],
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = sqlite_app.test_client()
    lock = hold_lock()
    for name, response in every_endpoint(client).items():
        assert_unavailable(response, name)
    assert len(outage_warnings(caplog)) == 1

    lock.rollback()
    assert client.get("/v1/jobs", headers=AUTH).status_code == 200
    assert any(r.getMessage() == "database available again" for r in caplog.records)

    hold_lock()
    assert_unavailable(client.get("/v1/jobs", headers=AUTH), "second outage")
    assert_unavailable(client.get("/v1/jobs", headers=AUTH), "second outage, again")
    assert len(outage_warnings(caplog)) == 2


def test_a_missing_table_is_still_a_500(
    sqlite_app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    with sqlite_app.extensions["motionhook"].db.transaction() as session:
        session.execute(text("DROP TABLE delivery_attempts"))
        session.execute(text("DROP TABLE deliveries"))
    response = sqlite_app.test_client().get("/v1/deliveries", headers=AUTH)
    assert response.status_code == 500
    assert response.get_json()["code"] == 500
    assert "Retry-After" not in response.headers
    assert not outage_warnings(caplog)
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)


# -- which errors count as "unavailable" ------------------------------------------------


def raised(action: Callable[[], object]) -> BaseException:
    try:
        action()
    except Exception as exc:
        return exc
    raise AssertionError("expected an error")


def test_refused_connection_and_pool_timeout_are_unavailable() -> None:
    refused = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x")
    assert database_unavailable(raised(refused.connect))
    engine = create_engine(
        "sqlite://", poolclass=QueuePool, pool_size=1, max_overflow=0, pool_timeout=0.01
    )
    with engine.connect():
        timeout = raised(engine.connect)
    assert isinstance(timeout, PoolTimeout)
    assert database_unavailable(timeout)


def test_integrity_and_schema_errors_are_not_unavailable(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
        connection.execute(text("INSERT INTO t VALUES (1)"))

    def duplicate() -> None:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO t VALUES (1)"))

    def missing_table() -> None:
        with engine.begin() as connection:
            connection.execute(text("SELECT * FROM nope"))

    integrity = raised(duplicate)
    assert isinstance(integrity, IntegrityError)
    assert not database_unavailable(integrity)
    schema = raised(missing_table)
    assert isinstance(schema, OperationalError)  # SQLite says OperationalError for this too
    assert not database_unavailable(schema)
    assert not database_unavailable(ValueError("not a database error"))


def test_unavailable_answers_carry_no_connection_details(refused_app: Flask) -> None:
    response = refused_app.test_client().get("/v1/jobs", headers=AUTH)
    assert response.status_code == 503
    assert "127.0.0.1" not in json.dumps(response.get_json())
