"""200 slow clients do not take the web process down (gunicorn with deploy/gunicorn.conf.py).

Half the connections send the headers of a ``POST /v1/jobs`` announcing a 100 kB
body and then trickle it a byte at a time; the other half trickle their request
headers. Meanwhile ``/healthz``, an authenticated list and a job submission must
keep answering promptly. Bounded: 200 connections, 8 seconds, all on loopback.
Under gunicorn's gthread worker (4 workers x 4 threads) the probes time out.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests
from sqlalchemy import create_engine, text

from service.db import normalize_url
from service.devstack import Stack, wait_until

SLOW_CONNECTIONS = 200
DURATION = 8.0
PROBE_TIMEOUT = 2.0
TRICKLE_EVERY = 0.5


@pytest.fixture
def web(make_stack: Callable[..., Stack]) -> Stack:
    stack = make_stack()
    stack.simulator = False
    stack.migrate()
    stack.start_web()
    return stack


@pytest.fixture
def slow_clients(web: Stack) -> Iterator[list[socket.socket]]:
    """Open the slow connections and keep trickling until the test ends."""
    sockets: list[socket.socket] = []
    stop = threading.Event()
    for number in range(SLOW_CONNECTIONS):
        sock = socket.create_connection(("127.0.0.1", web.web_port), timeout=5)
        if number % 2:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: slow\r\nX-Slow: ")
        else:
            sock.sendall(
                b"POST /v1/jobs HTTP/1.1\r\nHost: slow\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n{"
            )
        sockets.append(sock)

    def trickle() -> None:
        deadline = time.monotonic() + DURATION + 10  # bounded even if the test hangs
        while not stop.wait(TRICKLE_EVERY) and time.monotonic() < deadline:
            for sock in sockets:
                # The server may close a slow connection; that is allowed.
                with contextlib.suppress(OSError):
                    sock.send(b"a")

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        yield sockets
    finally:
        stop.set()
        thread.join(timeout=5)
        for sock in sockets:
            sock.close()


def test_slow_clients_do_not_stop_health_checks_or_requests(
    web: Stack, slow_clients: list[socket.socket]
) -> None:
    assert len(slow_clients) == SLOW_CONNECTIONS
    session = web.api()
    failures: list[str] = []
    probes = 0
    worst = 0.0
    deadline = time.monotonic() + DURATION
    pause = threading.Event()
    while time.monotonic() < deadline:
        for method, path, body, expected in (
            ("GET", "/healthz", None, 200),
            ("GET", "/v1/jobs?limit=5", None, 200),
            ("POST", "/v1/jobs", {"init_image": "https://example.com/a.png"}, 202),
        ):
            started = time.monotonic()
            try:
                response = session.request(
                    method, web.web_url + path, json=body, timeout=PROBE_TIMEOUT
                )
                if response.status_code != expected:
                    failures.append(f"{method} {path}: HTTP {response.status_code}")
            except requests.RequestException as exc:
                failures.append(f"{method} {path}: {type(exc).__name__}")
            worst = max(worst, time.monotonic() - started)
            probes += 1
        pause.wait(0.2)
    assert probes >= 15
    assert failures == [], f"{len(failures)} of {probes} probes failed (worst {worst:.2f} s)"


def test_a_request_waiting_on_the_database_does_not_hold_up_the_others(
    make_stack: Callable[..., Stack], stack_database_url: str
) -> None:
    """One gevent worker: while a query waits on a lock, /healthz still answers at once.

    psycopg was first imported by gunicorn's master, before gevent patched the
    worker; its C wait would block the whole worker for as long as the query waits.
    """
    if stack_database_url.startswith("sqlite"):
        pytest.skip("SQLite calls block in C; only PostgreSQL waits on a socket")
    stack = make_stack()
    stack.simulator = False
    stack.migrate()
    stack.start_web({"WEB_CONCURRENCY": "1"})
    session = stack.api()
    engine = create_engine(normalize_url(stack_database_url))
    blocked: list[int] = []
    with engine.connect() as locker:
        locker.execute(text("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE"))
        thread = threading.Thread(
            target=lambda: blocked.append(
                session.get(stack.web_url + "/v1/jobs", timeout=30).status_code
            ),
            daemon=True,
        )
        thread.start()
        waiting = text(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
        wait_until(lambda: locker.execute(waiting).scalar_one() > 0, timeout=10)
        health = requests.get(stack.web_url + "/healthz", timeout=PROBE_TIMEOUT)
        assert health.status_code == 200
        assert thread.is_alive(), "the list should still be waiting on the lock"
        locker.rollback()
    thread.join(timeout=10)
    assert blocked == [200]
