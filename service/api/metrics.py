"""``GET /metrics``: Prometheus exposition of this deployment's metrics."""

from __future__ import annotations

from flask import Response, request
from flask_smorest import Blueprint
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.errors import abort
from service.extension import services
from service.metrics import exposition, metrics_refusal

blp = Blueprint("metrics", __name__, description="Prometheus metrics")


@blp.get("/metrics")
@blp.doc(
    security=[],
    responses={
        "200": {
            "description": "Prometheus text format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
def metrics() -> Response:
    """Expose counters of every web process and gauges read from the database."""
    svc = services()
    refusal = metrics_refusal(svc.settings, request.headers.get("Authorization"))
    if refusal is not None:
        abort(refusal[0], message=refusal[1])
    return Response(exposition(svc.db), content_type=CONTENT_TYPE_LATEST)
