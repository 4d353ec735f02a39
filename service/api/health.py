"""Liveness and readiness.

``/healthz`` says the process answers (it never touches the database, so a
database outage does not get healthy pods restarted). ``/readyz`` says the
database answers and its schema is at this release's newest migration, or at a
newer one this release does not know: during a rolling deploy the migration step
upgrades the schema first, and the old pods, still serving, must stay ready
(migrations are written expand-then-contract, so old code runs on a newer schema).
"""

from __future__ import annotations

from typing import Any

from flask_smorest import Blueprint

from service.extension import services
from service.migrate import readiness

blp = Blueprint("health", __name__, description="Liveness and readiness probes")


@blp.get("/healthz")
@blp.doc(security=[])
def healthz() -> dict[str, Any]:
    """Say the process is alive."""
    return {"status": "ok"}


@blp.get("/readyz")
@blp.doc(security=[])
def readyz() -> tuple[dict[str, Any], int]:
    """Say whether the database answers and its schema is at (or past) the newest migration."""
    status = readiness(services().db)
    return status, 200 if status["ready"] else 503
