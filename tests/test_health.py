"""Liveness and readiness: /healthz, /readyz (database and migrations), and the worker's probes."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text
from sqlalchemy.engine import make_url
from werkzeug.test import Client

import service.db
from service import create_app
from service.db import Database
from service.extension import Services
from service.metrics import HEARTBEAT_STALE, Heartbeat, worker_wsgi_app
from service.migrate import MIGRATIONS, REVISIONS, upgrade
from tests.conftest import app_config


@pytest.fixture
def fresh_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Flask]:
    """An app on an empty SQLite database: nothing migrated yet."""
    monkeypatch.setenv("MOTIONHOOK_INSTANCE_PATH", str(tmp_path / "instance"))
    flask_app = create_app(
        app_config(f"sqlite:///{tmp_path / 'fresh.db'}", tmp_path, RATELIMIT="1/minute")
    )
    yield flask_app
    flask_app.extensions["motionhook"].db.dispose()


def test_healthz_says_alive_without_auth(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_revisions_list_every_migration_in_alembic_order() -> None:
    """/readyz reads REVISIONS instead of importing alembic: it must match alembic's reading."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory(str(MIGRATIONS))
    oldest_first = [script.revision for script in scripts.walk_revisions()][::-1]
    assert list(REVISIONS) == oldest_first
    assert scripts.get_heads() == [REVISIONS[-1]]


def test_readyz_is_200_on_a_migrated_database(client: FlaskClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json()["ready"] is True


def test_readyz_is_503_until_migrations_reach_head(fresh_app: Flask) -> None:
    client = fresh_app.test_client()
    before = client.get("/readyz")
    assert before.status_code == 503
    assert before.get_json()["database"] == "ok"
    assert before.get_json()["migration"] is None
    assert client.get("/healthz").status_code == 200
    upgrade(fresh_app.extensions["motionhook"].db)
    assert client.get("/readyz").status_code == 200


def test_readyz_stays_ready_on_a_schema_newer_than_this_release(fresh_app: Flask) -> None:
    db = fresh_app.extensions["motionhook"].db
    upgrade(db)
    with db.engine.begin() as connection:  # what the next release's migration leaves behind
        connection.execute(text("UPDATE alembic_version SET version_num = 'f00dfacefeed'"))
    answer = fresh_app.test_client().get("/readyz")
    assert answer.status_code == 200
    assert answer.get_json()["schema"] == "newer than this release"
    with db.engine.begin() as connection:
        connection.execute(text("DELETE FROM alembic_version"))
    assert fresh_app.test_client().get("/readyz").status_code == 503


def test_probes_and_metrics_are_never_rate_limited(fresh_app: Flask) -> None:
    client = fresh_app.test_client()
    for path in ("/healthz", "/readyz", "/metrics"):
        codes = {client.get(path).status_code for _ in range(5)}
        assert 429 not in codes, path


# -- a real database outage ------------------------------------------------------------


class TcpProxy:
    """Forward a local port to a TCP server; ``stop`` is a real outage, ``start`` a recovery."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port: int = probe.getsockname()[1]
        probe.close()
        self.listener: socket.socket | None = None
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        if self.listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would not.
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
            self.listener = None
        with self.lock:
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self.connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self.lock:
                self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@pytest.mark.postgresql
@pytest.mark.parametrize("stack_database_url", ["postgresql"], indirect=True)
def test_readyz_follows_a_database_outage_and_recovery(
    stack_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = make_url(stack_database_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    proxy.start()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    monkeypatch.setenv("MOTIONHOOK_INSTANCE_PATH", str(tmp_path / "instance"))
    flask_app = create_app(app_config(proxied, tmp_path))
    services: Services = flask_app.extensions["motionhook"]
    client = flask_app.test_client()
    try:
        upgrade(services.db)
        assert client.get("/readyz").status_code == 200

        proxy.stop()
        down = client.get("/readyz")
        assert down.status_code == 503
        assert down.get_json()["database"] == "unreachable"
        assert client.get("/healthz").status_code == 200
        assert b"motionhook_database_up 0.0" in client.get("/metrics").data

        proxy.start()
        up = client.get("/readyz")
        assert up.status_code == 200, up.get_json()
        assert b"motionhook_database_up 1.0" in client.get("/metrics").data
    finally:
        proxy.stop()
        services.db.dispose()


@pytest.mark.postgresql
@pytest.mark.parametrize("stack_database_url", ["postgresql"], indirect=True)
def test_a_pooled_connection_the_server_closed_while_idle_is_replaced(
    stack_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every checkout counts as "idle long enough" here, instead of waiting a second.
    monkeypatch.setattr(service.db, "PING_AFTER_IDLE", -1.0)
    db, other = Database(stack_database_url, pool_size=1), Database(stack_database_url)
    try:
        with db.transaction() as session:
            first = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        # The connection is back in the pool, idle: the server ends it (as a restart, an
        # idle timeout or a proxy would), waiting until the backend is gone.
        with other.transaction() as session:
            ended = session.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": first})
            assert ended.scalar_one() is True
        with db.transaction() as session:
            second = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        assert second != first
    finally:
        db.dispose()
        other.dispose()


# -- the worker's probes ---------------------------------------------------------------


def test_worker_probes_follow_its_main_loop(services: Services) -> None:
    now = [1000.0]
    heartbeat = Heartbeat(clock=lambda: now[0])
    client = Client(worker_wsgi_app(services, heartbeat))
    alive = client.get("/healthz")
    assert alive.status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert client.get("/elsewhere").status_code == 404
    now[0] += HEARTBEAT_STALE + 1  # the main loop stopped beating
    stuck = client.get("/healthz")
    assert stuck.status_code == 503
    assert stuck.get_json()["status"] == "stuck"
    heartbeat.beat()
    assert client.get("/healthz").status_code == 200
