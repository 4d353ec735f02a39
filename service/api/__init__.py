"""The HTTP API: flask-smorest blueprints, bearer auth and the one error shape."""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, request
from flask_smorest import Api as SmorestApi
from werkzeug.exceptions import HTTPException

from schemas.errors import ErrorSchema
from schemas.jobs import JobCreateSchema
from service.api import docs
from service.api.errors import register_database_errors
from service.extension import services

API_SETTINGS = {
    "API_TITLE": "motionhook",
    "API_VERSION": "1.0",
    "OPENAPI_VERSION": "3.0.3",
    "OPENAPI_URL_PREFIX": "/",
    "OPENAPI_JSON_PATH": "openapi.json",
    **docs.SETTINGS,
    "API_SPEC_OPTIONS": {
        "components": {"securitySchemes": docs.SECURITY_SCHEMES},
        "info": {
            "description": "Submit ModelsLab image-to-video jobs and get told when they finish."
        },
    },
}


API_MIMETYPES = frozenset({"application/json", "text/plain"})
API_CSP = "default-src 'none'; frame-ancestors 'none'"


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

    ERROR_SCHEMA = ErrorSchema

    def _register_pagination_header(self) -> None:
        """Leave flask-smorest's page-number header out: every list here pages by cursor."""

    def handle_http_exception(self, error: HTTPException) -> Any:
        data = getattr(error, "data", None)
        if data is None:
            data = error.data = {}  # type: ignore[attr-defined]
        if not data.get("message"):
            details = data.get("messages") or data.get("errors")
            if details:
                data["message"] = "; ".join(_flatten(details))
            elif error.code == 413:
                limit = services().settings.max_upload_bytes
                data["message"] = (
                    f"request body too large: uploads (field image) may be at most {limit} bytes"
                )
            else:
                data["message"] = error.description or error.name
        return super().handle_http_exception(error)


def add_security_headers(response: Response) -> Response:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    if response.mimetype in API_MIMETYPES:
        # Data, never a document: nothing in it may load, run or be framed.
        response.headers.setdefault("Content-Security-Policy", API_CSP)
    if request.path.startswith("/v1/"):
        # Answers may hold secrets (a subscription's whsec_ on create): no caching.
        response.headers.setdefault("Cache-Control", "no-store")
    if request.is_secure:
        response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
    return response


def register_api(app: Flask) -> Api:
    """Attach every blueprint and the OpenAPI documents to ``app``."""
    from service import dashboard
    from service.api import (
        admin,
        callbacks,
        chat,
        deliveries,
        events,
        health,
        jobs,
        metrics,
        projects,
        subscriptions,
    )
    from service.api.media import media_bp
    from service.api.ratelimit import init_limiter

    for key, value in API_SETTINGS.items():
        app.config.setdefault(key, value)
    api = Api(app, spec_kwargs={"extra_plugins": [docs.PathParameterDocs()]})
    api.spec.components.schema("JobCreate", schema=JobCreateSchema)
    api.spec.components.schema("JobCreateForm", docs.job_form_schema(api.ma_plugin.converter))
    api.register_blueprint(jobs.blp)
    api.register_blueprint(subscriptions.blp)
    api.register_blueprint(deliveries.blp)
    api.register_blueprint(events.blp)
    events.init_streams(app)
    api.register_blueprint(projects.blp)
    api.register_blueprint(admin.blp)
    api.register_blueprint(callbacks.blp)
    api.register_blueprint(chat.blp)
    api.register_blueprint(health.blp)
    api.register_blueprint(metrics.blp)
    app.register_blueprint(media_bp)
    app.register_blueprint(docs.assets)
    dashboard.init_app(app)
    svc = app.extensions["motionhook"]
    register_database_errors(app, svc.db, api.handle_http_exception)
    init_limiter(app, svc.settings)
    app.after_request(add_security_headers)
    return api
