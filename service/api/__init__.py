"""The HTTP API: flask-smorest blueprints, bearer auth and the one error shape."""

from __future__ import annotations

import hmac
from typing import Any

from flask import Flask, Response, request
from flask_smorest import Api as SmorestApi
from flask_smorest import abort
from werkzeug.exceptions import HTTPException

from service.extension import services

API_SETTINGS = {
    "API_TITLE": "motionhook",
    "API_VERSION": "1.0",
    "OPENAPI_VERSION": "3.0.3",
    "OPENAPI_URL_PREFIX": "/",
    "OPENAPI_JSON_PATH": "openapi.json",
    "OPENAPI_SWAGGER_UI_PATH": "/docs",
    "OPENAPI_SWAGGER_UI_URL": "https://cdn.jsdelivr.net/npm/swagger-ui-dist/",
    "API_SPEC_OPTIONS": {
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "info": {
            "description": "Submit ModelsLab image-to-video jobs and get told when they finish."
        },
    },
}


def _flatten(errors: Any, prefix: str = "") -> list[str]:
    """Turn marshmallow's nested error dict into ``field: message`` lines."""
    if isinstance(errors, dict):
        lines = []
        for key, value in errors.items():
            name = str(key) if not prefix else f"{prefix}.{key}"
            if key in ("json", "query", "form", "files", "headers", "_schema") and not prefix:
                name = ""
            lines.extend(_flatten(value, name))
        return lines
    if isinstance(errors, list):
        if all(isinstance(item, str) for item in errors):
            text = " ".join(errors)
            return [f"{prefix}: {text}" if prefix else text]
        return [line for item in errors for line in _flatten(item, prefix)]
    return [f"{prefix}: {errors}" if prefix else str(errors)]


class Api(SmorestApi):
    """flask-smorest with error messages that name the offending fields."""

    def handle_http_exception(self, error: HTTPException) -> Any:
        data = getattr(error, "data", None)
        if data and "messages" in data and not data.get("message"):
            data["message"] = "; ".join(_flatten(data["messages"])) or error.description
        if error.code == 413 and not (data and data.get("message")):
            limit = services().settings.max_upload_bytes
            error.data = {
                "message": f"request body too large: uploads (field image) may be at most "
                f"{limit} bytes"
            }
        return super().handle_http_exception(error)


def require_token() -> None:
    """Reject the request unless it carries one of the configured bearer tokens."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    valid = False
    if scheme.lower() == "bearer" and token:
        for candidate in services().settings.api_tokens:
            valid |= hmac.compare_digest(candidate.encode(), token.strip().encode())
    if not valid:
        abort(401, message="missing or invalid bearer token (Authorization: Bearer <token>)")


def current_token() -> str:
    return request.headers.get("Authorization", "").partition(" ")[2].strip()


def add_security_headers(response: Response) -> Response:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    return response


def register_api(app: Flask) -> Api:
    """Attach every blueprint and the OpenAPI documents to ``app``."""
    from service.api import callbacks, health, jobs
    from service.media import media_bp

    for key, value in API_SETTINGS.items():
        app.config.setdefault(key, value)
    api = Api(app)
    for blueprint in (jobs.blp,):
        blueprint.before_request(require_token)
        api.register_blueprint(blueprint)
    api.register_blueprint(callbacks.blp)
    api.register_blueprint(health.blp)
    app.register_blueprint(media_bp)
    app.after_request(add_security_headers)
    return api
