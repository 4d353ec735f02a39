"""Engine, sessions and wake-ups on SQLite and PostgreSQL.

SQLite runs in WAL mode and every transaction starts with ``BEGIN IMMEDIATE``,
so the single writer is decided up front instead of failing at commit time.
PostgreSQL wake-ups travel with ``NOTIFY`` inside the writing transaction, so a
worker hears about new work exactly when it becomes visible.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

WAKEUP_CHANNEL = "motionhook_work"
CONNECT_TIMEOUT = 5
NOTIFIED = "motionhook.notified"
NOTIFY = text("SELECT pg_notify(:channel, '')")


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs (PaaS give them that way)."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


class Database:
    """One engine and session factory per process."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = normalize_url(url)
        parsed = make_url(self.url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self.local_wakeup = threading.Event()
        if self.is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(
                self.url, connect_args={"timeout": 30, "check_same_thread": False}
            )
            _configure_sqlite(self.engine)
        else:
            # A bounded connect: /readyz must answer 503, not hang, when packets are dropped.
            self.engine = create_engine(
                self.url,
                pool_size=pool_size,
                max_overflow=pool_size,
                pool_pre_ping=True,
                connect_args={"connect_timeout": CONNECT_TIMEOUT},
            )
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[Session]:
        """Run one unit of work: commit on success, roll back on any error.

        ``durable=False`` lets PostgreSQL acknowledge the commit before its WAL is
        flushed to disk (``synchronous_commit = off``, this transaction only). Only
        for bookkeeping whose loss in a database crash is harmless: a lost lease
        or delivery outcome means the delivery is sent again, which at-least-once
        delivery allows. Never for state a client or ModelsLab was told about.
        """
        with self.sessions() as session, session.begin():
            if not durable and not self.is_sqlite:
                session.execute(text("SET LOCAL synchronous_commit TO OFF"))
            yield session

    def notify(self, session: Session) -> None:
        """Wake workers once this transaction commits (once, however often it is asked)."""
        transaction = session.get_transaction()
        if session.info.get(NOTIFIED) is transaction:
            return  # one wake-up per transaction is enough, and a statement less
        session.info[NOTIFIED] = transaction
        if self.is_sqlite:
            event.listen(session, "after_commit", lambda _s: self.local_wakeup.set(), once=True)
        else:
            session.connection().execute(NOTIFY, {"channel": WAKEUP_CHANNEL})

    def dispose(self) -> None:
        self.engine.dispose()


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
