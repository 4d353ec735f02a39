"""``/docs``: Swagger UI served from motionhook's own package, never from a CDN.

The page is flask-smorest's; its scripts and styles come from the pinned
``flask-swagger-ui`` wheel (which ships Swagger UI's ``dist`` folder) and are
served here, so the docs work on a machine without internet.
"""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any

from apispec import BasePlugin
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

# What each id in a path is and where it comes from (the URL rules only know "a string").
PATH_PARAMETERS = {
    "job_id": "The job's id (`id` in the answer of POST /v1/jobs), "
    "e.g. job_3huzczuwoo3ap64vxsindikd",
    "subscription_id": "The subscription's id (`id` in the answer of POST /v1/subscriptions), "
    "e.g. sub_gujovry5eb2fuldtq5xremjt",
    "delivery_id": "The delivery's id (from GET /v1/deliveries), e.g. dlv_rtlktymylqudz6rxj47a35sv",
    "project_id": "The project's id (from GET /v1/projects), e.g. prj_6cwvt3km4fmcqadovsu7p2wq",
    "token_id": "The token's id (from GET /v1/projects/{project_id}/tokens), "
    "e.g. tok_qkzkvsczbxddtpwzl6biql43",
    "track_id": "The job id motionhook gave ModelsLab as track_id; ModelsLab calls this URL "
    "itself, with its sig",
}

assets = Blueprint("docs_assets", __name__)


class PathParameterDocs(BasePlugin):
    """Describe every id in a path (see PATH_PARAMETERS) as the document is built."""

    def path_helper(
        self, path: str | None = None, operations: Any = None, parameters: Any = None, **_: Any
    ) -> None:
        for parameter in parameters or []:
            if parameter.get("in") == "path" and parameter.get("name") in PATH_PARAMETERS:
                parameter.setdefault("description", PATH_PARAMETERS[parameter["name"]])


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
