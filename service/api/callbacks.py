"""``POST /v1/callbacks/modelslab/{track_id}``: ModelsLab tells us a job is done."""

from __future__ import annotations

from typing import Any

from flask import request
from flask_smorest import Blueprint

from service.api.errors import abort
from service.callbacks import receive_callback, verify_callback_token
from service.extension import services
from service.metrics import record_callback

blp = Blueprint(
    "callbacks",
    __name__,
    url_prefix="/v1/callbacks",
    description="Callbacks from ModelsLab (authenticated by the signed URL)",
)


@blp.post("/modelslab/<string:track_id>")
@blp.doc(
    security=[],
    parameters=[
        {
            "name": "sig",
            "in": "query",
            "required": True,
            "schema": {"type": "string"},
            "description": "HMAC-SHA256 of the track_id under MOTIONHOOK_CALLBACK_SECRET, "
            "put into the callback URL motionhook hands ModelsLab",
        }
    ],
    requestBody={"content": {"application/json": {"schema": {"type": "object"}}}},
)
def modelslab_callback(track_id: str) -> tuple[dict[str, Any], int]:
    """Verify the URL token, store the body verbatim and apply it."""
    svc = services()
    settings = svc.settings
    secrets = (settings.callback_secret, settings.callback_secret_previous)
    if not verify_callback_token(secrets, track_id, request.args.get("sig")):
        record_callback("rejected")
        abort(401, message="callback signature (sig) is missing or invalid")
    outcome = receive_callback(
        svc.db,
        track_id,
        request.get_data(cache=False),
        callback_grace=settings.callback_grace,
        job_timeout=settings.job_timeout,
        media_url=svc.media_url,
        api_key=settings.modelslab_api_key,
        max_per_job=settings.max_callbacks_per_job,
    )
    record_callback(outcome.outcome)
    if outcome.http_status >= 400:
        abort(outcome.http_status, message=outcome.message)
    return {"received": True, "outcome": outcome.outcome}, outcome.http_status
