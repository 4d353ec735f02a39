"""Alembic migrations, run programmatically (``motionhook db upgrade``), and their status.

Only ``upgrade`` imports alembic. ``/readyz`` asks every few seconds whether the
database is at this release's newest migration; answering that through alembic's
script directory would import alembic, mako and their templates into every web
process (about 12 MB and 150 ms of start each). So this module names its
migrations in ``REVISIONS``, and ``tests/test_health.py`` checks that list against
alembic's own reading of ``migrations/versions`` (a new migration that is not
added here fails the test suite, not a deploy).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from service.db import Database

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version"
# Every migration's revision, oldest first; the last is the head.
REVISIONS = ("0001", "0002", "0003", "0004", "0005", "0006", "0007", "0008", "0009")


def alembic_config(db: Database) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", db.url.replace("%", "%%"))
    config.attributes["engine"] = db.engine
    return config


def upgrade(db: Database, revision: str = "head") -> None:
    """Bring the schema to ``revision``; safe to run on every release."""
    from alembic import command

    command.upgrade(alembic_config(db), revision)


def head_revision() -> str:
    return REVISIONS[-1]


def is_known_revision(revision: str) -> bool:
    """Whether ``revision`` is one of this release's migrations."""
    return revision in REVISIONS


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at, read from alembic's table (None before the first)."""
    if not inspect(connection).has_table(VERSION_TABLE):
        return None
    versions = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars()
    return ",".join(sorted(versions)) or None


def readiness(db: Database) -> dict[str, Any]:
    """Whether the database answers and is at this release's newest migration.

    A schema newer than this release (a revision it does not know) counts as
    ready: during a rolling deploy the migration step runs first, and the old
    pods, still serving, must stay ready (migrations are expand-then-contract).
    """
    head = head_revision()
    try:
        with db.engine.connect() as connection:
            current = current_revision(connection)
    except SQLAlchemyError as exc:
        return {"ready": False, "database": "unreachable", "error": type(exc).__name__}
    if current == head:
        return {"ready": True, "database": "ok", "migration": current}
    if current is not None and not is_known_revision(current):
        return {
            "ready": True,
            "database": "ok",
            "migration": current,
            "expected": head,
            "schema": "newer than this release",
        }
    return {"ready": False, "database": "ok", "migration": current, "expected": head}
