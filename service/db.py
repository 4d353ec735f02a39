"""Engine, sessions and wake-ups on SQLite and PostgreSQL.

SQLite runs in WAL mode and every transaction starts with ``BEGIN IMMEDIATE``,
so the single writer is decided up front instead of failing at commit time.
PostgreSQL wake-ups travel with ``NOTIFY`` inside the writing transaction, so a
worker hears about new work exactly when it becomes visible. Behind a transaction
pooler (PgBouncer, Neon's and Supabase's pooled URLs; say so with ``?pgbouncer=true``)
prepared statements are off and LISTEN needs a direct URL of its own
(``MOTIONHOOK_DATABASE_LISTEN_URL``); without one, workers poll.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from service.retry import Backoff

log = logging.getLogger("motionhook.db")
T = TypeVar("T")

WAKEUP_CHANNEL = "motionhook_work"
CONNECT_TIMEOUT = 5
# A pooled connection idle longer than this is pinged before use (see _ping_when_idle).
PING_AFTER_IDLE = 1.0
CHECKED_IN = "motionhook.checked_in"
NOTIFIED = "motionhook.notified"
NOTIFY = text("SELECT pg_notify(:channel, '')")
# The URL flag that says a transaction pooler sits in front of PostgreSQL (Prisma's spelling).
POOLER_FLAG = "pgbouncer"


# What SQLite says when another connection holds the write lock past busy_timeout.
SQLITE_BUSY = ("database is locked", "database is busy", "database table is locked")


def database_unavailable(error: BaseException) -> bool:
    """Whether ``error`` means the database cannot be reached right now (wait it out).

    PostgreSQL down, restarting, refusing or dropping connections, the pool
    exhausted, or SQLite's write lock held too long: trying again later is the
    answer. Errors of the statement itself (a constraint, a syntax error, a
    missing table) are bugs and say False.
    """
    if isinstance(error, DisconnectionError | PoolTimeout):
        return True
    if isinstance(error, DBAPIError):
        if error.connection_invalidated:
            return True
        error = error.orig if error.orig is not None else error
    if isinstance(error, sqlite3.OperationalError):
        return any(text in str(error).lower() for text in SQLITE_BUSY)
    # psycopg is imported with the first PostgreSQL engine: without one, no error is its.
    psycopg = sys.modules.get("psycopg")
    return psycopg is not None and isinstance(
        error, psycopg.OperationalError | psycopg.InterfaceError
    )


class Outage:
    """Rides out database outages for one process: one WARNING each, capped backoff.

    Every place that finds the database gone (the worker's loop, its LISTEN
    thread, a task, settlement, a web request) reports it here: the first report
    of an outage logs one WARNING, later ones only lengthen the wait (0.2 s
    doubling to 5 s); the first success after it logs that the database is back.
    """

    def __init__(self, consequence: str | None = None) -> None:
        """``consequence`` replaces "retrying in N s" in the WARNING (web answers 503)."""
        self._lock = threading.Lock()
        self._backoff = Backoff()
        self._consequence = consequence

    @property
    def ongoing(self) -> bool:
        return self._backoff.failing

    def failed(self, error: BaseException) -> float:
        """Record a failure; return how long to wait before trying again."""
        with self._lock:
            first = not self._backoff.failing
            delay = self._backoff.next()
        if first:
            log.warning(
                "database unavailable; %s",
                self._consequence or f"retrying in {delay:.1f} s",
                extra={"error": type(error).__name__},
            )
        return delay

    def recovered(self) -> None:
        """Record that the database answered."""
        if not self._backoff.failing:
            return  # the common case, without the lock
        with self._lock:
            ended = self._backoff.reset()
        if ended:
            log.info("database available again")


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs (PaaS give them that way)."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def split_pooler_flag(url: str) -> tuple[str, bool]:
    """Remove the ``pgbouncer`` flag from ``url`` (psycopg refuses unknown parameters);
    return the URL and whether the flag said a transaction pooler is in the way."""
    parsed = make_url(url)
    flag = parsed.query.get(POOLER_FLAG)
    if flag is None:
        return url, False
    pooled = str(flag).strip().lower() in {"1", "true", "yes", "on"}
    return parsed.difference_update_query([POOLER_FLAG]).render_as_string(False), pooled


class Database:
    """One engine and session factory per process.

    ``listen_url`` is where workers LISTEN for wake-ups: the given direct URL, else
    the main URL unless it goes through a transaction pooler (then None: poll).
    """

    def __init__(self, url: str, *, listen_url: str | None = None, pool_size: int = 10) -> None:
        self.url, self.pooled = split_pooler_flag(normalize_url(url))
        parsed = make_url(self.url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self.listen_url: str | None = None
        if not self.is_sqlite:
            direct = normalize_url(listen_url) if listen_url else None
            self.listen_url = direct or (None if self.pooled else self.url)
        # SQLite: set after every commit that asked to wake workers (``notify``), as a
        # NOTIFY would be. ``local_wakeup`` also wakes a waiting worker; ``local_commit``
        # tells it that new work may be due (not only that an item of its own finished).
        self.local_wakeup = threading.Event()
        self.local_commit = threading.Event()
        self.outage = Outage()
        if self.is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                _create_private_file(Path(parsed.database))
            self.engine = create_engine(
                self.url,
                connect_args={"timeout": 30, "check_same_thread": False},
                hide_parameters=True,
            )
            _configure_sqlite(self.engine)
        else:
            self.engine = _postgresql_engine(self.url, pool_size=pool_size, pooled=self.pooled)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._relaxed_engine: Engine | None = None
        self._relaxed: sessionmaker[Session] | None = None
        self._relaxed_lock = threading.Lock()

    def _relaxed_sessions(self) -> sessionmaker[Session]:
        """Sessions on a small pool whose connections commit with ``synchronous_commit`` off.

        Set once per connection (a startup option), not with a ``SET LOCAL`` round
        trip per transaction; only the worker's delivery bookkeeping opens it.
        """
        with self._relaxed_lock:
            if self._relaxed is None:
                self._relaxed_engine = _postgresql_engine(
                    self.url, pool_size=2, pooled=self.pooled, options="-c synchronous_commit=off"
                )
                self._relaxed = sessionmaker(self._relaxed_engine, expire_on_commit=False)
            return self._relaxed

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[Session]:
        """Run one unit of work: commit on success, roll back on any error.

        ``durable=False`` lets PostgreSQL acknowledge the commit before its WAL is
        flushed to disk (``synchronous_commit = off``, this transaction only). Only
        for bookkeeping whose loss in a database crash is harmless: a lost lease
        or delivery outcome means the delivery is sent again, which at-least-once
        delivery allows. Never for state a client or ModelsLab was told about.
        """
        sessions = self.sessions if durable or self.is_sqlite else self._relaxed_sessions()
        with sessions() as session, session.begin():
            yield session

    def write_until(
        self, deadline: float, work: Callable[[Session], T], *, durable: bool = True
    ) -> T:
        """Run ``work`` in a transaction, trying again through an outage until ``deadline``.

        For what must not be lost once done outside the database (ModelsLab took a
        job, a receiver got a message): the result is written as soon as the
        database is back, while the lease still guards the work. Past ``deadline``
        (a ``time.monotonic()``), or for any other error, the error is raised.
        """
        while True:
            try:
                with self.transaction(durable=durable) as session:
                    result = work(session)
            except Exception as exc:
                remaining = deadline - time.monotonic()
                if not database_unavailable(exc) or remaining <= 0:
                    raise
                time.sleep(min(self.outage.failed(exc), remaining))
                continue
            self.outage.recovered()
            return result

    def notify(self, session: Session) -> None:
        """Wake workers once this transaction commits (once, however often it is asked)."""
        transaction = session.get_transaction()
        if session.info.get(NOTIFIED) is transaction:
            return  # one wake-up per transaction is enough, and a statement less
        session.info[NOTIFIED] = transaction
        if self.is_sqlite:
            event.listen(session, "after_commit", self._committed, once=True)
        else:
            session.connection().execute(NOTIFY, {"channel": WAKEUP_CHANNEL})

    def _committed(self, _session: Session) -> None:
        self.local_commit.set()
        self.local_wakeup.set()

    def dispose(self) -> None:
        self.engine.dispose()
        if self._relaxed_engine is not None:
            self._relaxed_engine.dispose()


def _create_private_file(path: Path) -> None:
    """Create the SQLite file readable by its owner only (it holds subscription secrets).

    SQLite gives its ``-wal`` and ``-shm`` files the database file's permissions.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


def _postgresql_engine(
    url: str, *, pool_size: int, pooled: bool = False, options: str | None = None
) -> Engine:
    # A bounded connect: /readyz must answer 503, not hang, when packets are dropped.
    connect_args: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT}
    if pooled:
        # A transaction pooler hands each transaction to any server connection: a
        # statement prepared on one is unknown on the next.
        connect_args["prepare_threshold"] = None
    if options:
        # Keep the URL's own startup options (a search_path, say): connect_args replace them.
        existing = make_url(url).query.get("options")
        connect_args["options"] = f"{existing} {options}" if isinstance(existing, str) else options
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        connect_args=connect_args,
        # Bound values (subscription URLs, secrets) never appear in SQL error messages.
        hide_parameters=True,
    )
    _ping_when_idle(engine)
    return engine


def _ping_when_idle(engine: Engine) -> None:
    """Check a pooled connection before use only when it sat idle for a while.

    ``pool_pre_ping`` costs a round trip on every checkout, which under load is
    one statement in four of a callback. A connection that was in use a moment
    ago is alive; one that sat idle may have been closed by the server, a proxy
    or a restart, so it is pinged and, if dead, replaced (SQLAlchemy's "custom
    pessimistic" disconnect handling). A failure on a busy connection still
    invalidates the whole pool, so a restart costs at most one failed statement
    per connection that was checked in moments before it.
    """

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info[CHECKED_IN] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle = time.monotonic() - record.info.get(CHECKED_IN, -math.inf)
        if idle <= PING_AFTER_IDLE:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise DisconnectionError(f"stale pooled connection: {type(exc).__name__}") from exc
        if not alive:
            raise DisconnectionError("stale pooled connection")


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
