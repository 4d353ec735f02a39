"""``/docs``: Swagger UI served from motionhook's own package, never from a CDN.

The page is flask-smorest's; its scripts and styles come from the pinned
``flask-swagger-ui`` wheel (which ships Swagger UI's ``dist`` folder) and are
served here, so the docs work on a machine without internet.
"""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any

from flask import Blueprint, Response, send_from_directory

from schemas.jobs import SAMPLE_IMAGE_URL, JobCreateSchema

ASSETS_URL = "/docs/assets/"
ASSETS_DIR = str(files("flask_swagger_ui") / "dist")
ASSET_MAX_AGE = 24 * 3600

BEARER_DESCRIPTION = (
    "An API token. In development (`make run`) motionhook generates one into "
    "`instance/api_token` and prints it at start: `TOKEN=$(cat instance/api_token)`. "
    "In production the tokens are the comma-separated `MOTIONHOOK_API_TOKENS`. "
    "Paste the token alone (without `Bearer`) into Authorize."
)

SETTINGS: dict[str, Any] = {
    "OPENAPI_SWAGGER_UI_PATH": "/docs",
    "OPENAPI_SWAGGER_UI_URL": ASSETS_URL,
    "OPENAPI_SWAGGER_UI_CONFIG": {"persistAuthorization": True, "tryItOutEnabled": True},
}
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": BEARER_DESCRIPTION}
}

IDEMPOTENCY_KEY = {
    "in": "header",
    "name": "Idempotency-Key",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    "description": "Retry-safe submission: the same key with the same body returns the "
    "same job (200); with another body, 409. Any unique string, e.g. a UUID.",
}
# The body "Try it out" sends as is against `make run`: the bundled sample image.
JOB_EXAMPLE = {
    "init_image": SAMPLE_IMAGE_URL,
    "prompt": "a slow zoom over the hills",
    "model_id": "wan2.2",
    "num_frames": 16,
    "metadata": {"order": "1234"},
}
# In a multipart form these fields are JSON text (see service.api.jobs).
FORM_JSON_FIELDS = ("metadata", "webhook_events")

assets = Blueprint("docs_assets", __name__)


@assets.get(f"{ASSETS_URL}<path:filename>")
def asset(filename: str) -> Response:
    """Serve one Swagger UI file from the installed package."""
    return send_from_directory(ASSETS_DIR, filename, max_age=ASSET_MAX_AGE)


def job_form_schema(converter: Any) -> dict[str, Any]:
    """The multipart form of ``POST /v1/jobs``: every JSON field, plus the ``image`` file."""
    schema: dict[str, Any] = converter.schema2jsonschema(JobCreateSchema)
    properties = dict(schema["properties"])
    properties.pop("init_image")
    for name in FORM_JSON_FIELDS:
        described = properties[name].get("description", "")
        properties[name] = {
            "type": "string",
            "description": f"{described} As JSON text in a form.",
            "example": json.dumps(properties[name].get("example"), separators=(",", ":")),
        }
    properties = {
        "image": {
            "type": "string",
            "format": "binary",
            "description": "The picture to animate (a PNG, JPEG, WebP or GIF file).",
        },
        **properties,
    }
    return {"type": "object", "properties": properties, "required": ["image"]}
