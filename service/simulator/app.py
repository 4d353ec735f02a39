"""Flask edge of the ModelsLab simulator: the upstream API, the outputs and a control API."""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from typing import Any

from flask import Blueprint, Flask, Response, abort, current_app, request
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

from .engine import Simulator
from .knobs import SimulatorKnobs
from .wire import describe_validation_error

EXTENSION_KEY = "motionhook.simulator"
SAMPLE_IMAGE = "sample.png"

modelslab = Blueprint("modelslab", __name__)
control = Blueprint("simulator_control", __name__, url_prefix="/_sim")


def create_simulator_app(
    knobs: SimulatorKnobs | None = None,
    *,
    api_keys: Iterable[str] = (),
    public_url: str | None = None,
) -> Flask:
    """Build a Flask app that behaves like ModelsLab's img2video API.

    One of ``api_keys``, when given, must be sent as ``key`` (any key is taken
    otherwise); each key is its own account with its own queued-request cap, and
    ``/_sim/stats`` counts by account (``accounts``, named by ``key_fingerprint``).
    ``public_url`` is the base of the
    output, fetch and future links (else the request's host URL).
    """
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep ModelsLab's field order
    app.extensions[EXTENSION_KEY] = Simulator(knobs, api_keys=api_keys, public_url=public_url)
    app.register_blueprint(modelslab)
    app.register_blueprint(control)
    app.register_error_handler(HTTPException, _http_error)
    return app


def get_simulator(app: Flask) -> Simulator:
    """Return the simulator engine behind an app made by ``create_simulator_app``."""
    simulator: Simulator = app.extensions[EXTENSION_KEY]
    return simulator


def _simulator() -> Simulator:
    return get_simulator(current_app)


def _json_body() -> Any:
    """The decoded JSON body, whatever the Content-Type says (None when it is not JSON)."""
    return request.get_json(force=True, silent=True)


def _base_url() -> str:
    return request.host_url.rstrip("/")


@modelslab.post("/api/v6/video/img2video")
def submit() -> tuple[dict[str, Any], int]:
    """Queue (or, with knobs, answer at once) an image-to-video generation."""
    return _simulator().submit(_json_body(), base_url=_base_url())


@modelslab.post("/api/v6/video/fetch/<int:job_id>")
def fetch(job_id: int) -> tuple[dict[str, Any], int]:
    """Report on a generation, like ModelsLab's fetch endpoint."""
    return _simulator().fetch(job_id, _json_body())


@modelslab.get("/outputs/<int:job_id>.<any(mp4, gif):output_type>")
def output(job_id: int, output_type: str) -> Response:
    """Serve a rendered video (404 while it is not ready, like ModelsLab's future links)."""
    video = _simulator().output(job_id, output_type)
    if video is None:
        abort(404, description="Output not found (it may not be ready yet)")
    response = Response(video.data, mimetype=video.content_type)
    response.make_conditional(request, accept_ranges=True, complete_length=len(video.data))
    return response


@control.get("/knobs")
def get_knobs() -> dict[str, Any]:
    """Return the knobs in force."""
    return _simulator().knobs.as_dict()


@control.put("/knobs")
def put_knobs() -> tuple[dict[str, Any], int] | dict[str, Any]:
    """Apply a partial update of the knobs and return them all."""
    changes = request.get_json(silent=True)
    if not isinstance(changes, dict):
        return {"status": "error", "message": "The request body must be a JSON object"}, 400
    try:
        return _simulator().update_knobs(changes).as_dict()
    except ValidationError as exc:
        return {"status": "error", "message": describe_validation_error(exc)}, 400


@control.get("/stats")
def get_stats() -> dict[str, Any]:
    """Return counters and the most recent callbacks."""
    return _simulator().stats()


@control.post("/reset")
def reset() -> dict[str, Any]:
    """Forget jobs and stats; with ``{"knobs": true}`` also restore the initial knobs."""
    body = request.get_json(silent=True)
    restore_knobs = isinstance(body, dict) and body.get("knobs") is True
    _simulator().reset(knobs=restore_knobs)
    return {"status": "ok", "knobs": _simulator().knobs.as_dict()}


@control.get("/sample.png")
def sample_image() -> Response:
    """Serve the bundled sample image, handy as an ``init_image`` in demos."""
    data = resources.files("service").joinpath("static", SAMPLE_IMAGE).read_bytes()
    return Response(data, mimetype="image/png")


def _http_error(error: HTTPException) -> tuple[dict[str, Any], int]:
    """Answer HTTP errors in ModelsLab's error shape."""
    return {"status": "error", "message": error.description or error.name}, error.code or 500
