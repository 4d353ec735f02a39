"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from flask_smorest import Blueprint

from service.extension import services
from service.migrate import migration_status

blp = Blueprint("health", __name__, description="Liveness and readiness probes")


@blp.get("/healthz")
@blp.doc(security=[])
def healthz() -> dict[str, Any]:
    """Say the process is alive."""
    return {"status": "ok"}


@blp.get("/readyz")
@blp.doc(security=[])
def readyz() -> tuple[dict[str, Any], int]:
    """Say whether the database answers and its schema is at the newest migration."""
    status = migration_status(services().db)
    code = 200 if status["ready"] else 503
    return status, code
