"""``/v1/admin``: operator endpoints for admin tokens only."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from flask_smorest import Blueprint

from schemas.admin import DrainQuerySchema, DrainReportSchema
from service.api.auth import require_admin
from service.extension import services
from service.worker import drain_due_work

blp = Blueprint(
    "admin",
    __name__,
    url_prefix="/v1/admin",
    description="Operator endpoints (admin tokens only)",
)
blp.before_request(require_admin)
SECURITY: list[dict[str, list[str]]] = [{"bearer": []}]


@blp.post("/drain")
@blp.doc(security=SECURITY)
@blp.arguments(DrainQuerySchema, location="query")
@blp.response(200, DrainReportSchema)
def drain(params: dict[str, Any]) -> dict[str, Any]:
    """Run the work that is due inside this request, within ``max_seconds``.

    For platforms that bill or run only during requests (Cloud Run with Cloud
    Scheduler): call it on a schedule; ``budget_exhausted`` says to call again.
    """
    return asdict(drain_due_work(services(), max_seconds=params["max_seconds"]))
