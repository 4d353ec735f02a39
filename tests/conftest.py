"""Shared fixtures: the app on SQLite and PostgreSQL, a client, signed callbacks, a stack.

Every database test runs on SQLite, and on PostgreSQL too when
``MOTIONHOOK_TEST_DATABASE_URL`` is set (``.ci/run`` sets it). Each PostgreSQL
test gets a schema of its own, so tests never see each other's rows.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text

from service import create_app
from service.callbacks import callback_token
from service.cli import main
from service.db import normalize_url
from service.devstack import Stack, wait_until
from service.extension import Services
from service.migrate import upgrade

TOKEN = "test-token"
CALLBACK_SECRET = "test-callback-secret"
PG_URL = os.environ.get("MOTIONHOOK_TEST_DATABASE_URL")

ENGINES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)]


def pytest_report_header() -> str:
    if PG_URL:
        return "motionhook: PostgreSQL tests enabled (MOTIONHOOK_TEST_DATABASE_URL)"
    return "motionhook: PostgreSQL tests SKIPPED (set MOTIONHOOK_TEST_DATABASE_URL to run them)"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgresql: runs against PostgreSQL")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if PG_URL:
        return
    skip = pytest.mark.skip(reason="PostgreSQL not configured (MOTIONHOOK_TEST_DATABASE_URL)")
    for item in items:
        if "postgresql" in item.keywords:
            item.add_marker(skip)


def app_config(database_url: str, tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    return {
        "DATABASE_URL": database_url,
        "API_TOKENS": TOKEN,
        "CALLBACK_SECRET": CALLBACK_SECRET,
        "PUBLIC_URL": "http://127.0.0.1:8000",
        "STORAGE_URL": f"file://{tmp_path / 'media'}",
        "ALLOW_PRIVATE_TARGETS": False,
        **overrides,
    }


@pytest.fixture
def app_overrides() -> dict[str, Any]:
    """Settings of the ``app`` fixture beyond ``app_config``'s; a test module may override it."""
    return {}


@pytest.fixture(params=ENGINES)
def app(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    app_overrides: dict[str, Any],
) -> Iterator[Flask]:
    """The web app on a migrated database (SQLite, and PostgreSQL when configured)."""
    monkeypatch.setenv("MOTIONHOOK_INSTANCE_PATH", str(tmp_path / "instance"))
    url = _make_url(request, request.param, tmp_path)
    flask_app = create_app(app_config(url, tmp_path, **app_overrides))
    services: Services = flask_app.extensions["motionhook"]
    upgrade(services.db)
    yield flask_app
    services.db.dispose()


def _make_url(request: pytest.FixtureRequest, engine_name: str, tmp_path: Path) -> str:
    if engine_name == "sqlite":
        return f"sqlite:///{tmp_path / 'motionhook.db'}"
    assert PG_URL
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(normalize_url(PG_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()

    request.addfinalizer(drop)
    separator = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{separator}options=-csearch_path%3D{schema}"


@pytest.fixture
def services(app: Flask) -> Services:
    return app.extensions["motionhook"]  # type: ignore[no-any-return]


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def motionhook(services: Services, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """Run the ``motionhook`` command against the test app's database and settings."""
    settings = services.settings
    monkeypatch.setenv("MOTIONHOOK_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("MOTIONHOOK_STORAGE_URL", settings.storage_url)
    monkeypatch.setenv("MOTIONHOOK_CALLBACK_SECRET", settings.callback_secret)
    monkeypatch.setenv("MOTIONHOOK_MODELSLAB_API_KEY", settings.modelslab_api_key)

    def run(*args: str, exit_code: int = 0, stdin: str | None = None) -> Any:
        result = CliRunner().invoke(main, list(args), input=stdin)
        assert result.exit_code == exit_code, result.output
        return result

    return run


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def post_callback(client: FlaskClient) -> Callable[..., Any]:
    """POST a callback for ``track_id`` signed like motionhook's callback URLs."""

    def post(track_id: str, body: Any, *, sig: str | None = None, raw: bytes | None = None) -> Any:
        token = callback_token(CALLBACK_SECRET, track_id) if sig is None else sig
        data = raw if raw is not None else json.dumps(body).encode()
        return client.post(
            f"/v1/callbacks/modelslab/{track_id}?sig={token}",
            data=data,
            content_type="application/json",
        )

    return post


@pytest.fixture(params=ENGINES)
def stack_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL for end-to-end stacks (SQLite, and PostgreSQL when configured)."""
    return _make_url(request, request.param, tmp_path)


@pytest.fixture
def make_stack(tmp_path: Path, stack_database_url: str) -> Iterator[Callable[..., Stack]]:
    """Build real process stacks (web, worker, simulator) on loopback; stopped at teardown."""
    stacks: list[Stack] = []

    def make(**env: str) -> Stack:
        stack = Stack(
            tmp_path / f"stack{len(stacks)}",
            env={"MOTIONHOOK_DATABASE_URL": stack_database_url, **env},
        )
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.kill()


def eventually(
    stack: Stack, predicate: Callable[[], object], message: str, timeout: float = 30.0
) -> Any:
    """``wait_until``, failing with the tail of every process log when time runs out."""
    try:
        return wait_until(predicate, timeout=timeout, message=message)
    except TimeoutError as exc:
        logs = "\n".join(
            f"--- {process.name} (exit {process.popen.poll()}) ---\n{process.log()[-3000:]}"
            for process in stack.processes
        )
        pytest.fail(f"{exc}\n{logs}")
