"""Alembic migrations, run programmatically (``motionhook db upgrade``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.exc import SQLAlchemyError

from service.db import Database

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(db: Database) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", db.url.replace("%", "%%"))
    config.attributes["engine"] = db.engine
    return config


def upgrade(db: Database, revision: str = "head") -> None:
    """Bring the schema to ``revision``; safe to run on every release."""
    command.upgrade(alembic_config(db), revision)


def head_revision() -> str | None:
    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


def migration_status(db: Database) -> dict[str, Any]:
    """Report whether the database answers and is at the newest migration."""
    head = head_revision()
    try:
        with db.engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    except SQLAlchemyError as exc:
        return {"ready": False, "database": "unreachable", "error": type(exc).__name__}
    if current != head:
        return {"ready": False, "database": "ok", "migration": current, "expected": head}
    return {"ready": True, "database": "ok", "migration": current}
