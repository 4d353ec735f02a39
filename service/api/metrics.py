"""``GET /metrics``: Prometheus exposition of this deployment's metrics."""

from __future__ import annotations

from flask import Response, request
from flask_smorest import Blueprint, abort
from prometheus_client import CONTENT_TYPE_LATEST

from service.extension import services
from service.metrics import exposition, token_allows

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
    if not token_allows(svc.settings.metrics_token, request.headers.get("Authorization")):
        abort(401, message="metrics need the metrics token (Authorization: Bearer <token>)")
    return Response(exposition(svc.db), content_type=CONTENT_TYPE_LATEST)
