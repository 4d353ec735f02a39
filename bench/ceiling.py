"""The ceiling for the ingest benchmark: a bare Flask app that parses the JSON and answers 200.

Served by the same gunicorn config file as motionhook's ``web``:

    gunicorn 'bench.ceiling:create_app()' -c deploy/gunicorn.conf.py

It has the callback route's shape (same path, same body) but no signature check,
no database and no schema, so the ratio motionhook/ceiling says what motionhook's
own work costs on top of gunicorn + Flask + JSON.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, abort, request


def create_app() -> Flask:
    """Build the bare app."""
    app = Flask(__name__)

    @app.post("/v1/callbacks/modelslab/<string:track_id>")
    def callback(track_id: str) -> tuple[dict[str, Any], int]:
        body = request.get_json(force=True, silent=True)
        if not isinstance(body, dict):
            abort(400)
        return {"received": True, "outcome": "applied"}, 200

    @app.get("/readyz")
    def readyz() -> dict[str, Any]:
        return {"ready": True}

    return app
