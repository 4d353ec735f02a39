"""motionhook's job resource and the body of ``POST /v1/jobs``."""

from __future__ import annotations

import json
from typing import Any

from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    fields,
    validate,
    validates,
    validates_schema,
)

from schemas.upstream import SUPPORTED_MODELS, Img2VideoParams

JOB_STATUSES = ("queued", "processing", "completed", "failed")
EVENT_TYPES = ("job.processing", "job.completed", "job.failed")
MAX_METADATA_BYTES = 4096


class JobCreateSchema(Img2VideoParams):
    """What a client may send; the upstream key, webhook and track_id are ours."""

    class Meta:
        unknown = RAISE

    init_image = fields.Url(schemes={"http", "https"}, require_tld=False)
    model_id = fields.String(
        load_default="wan2.2",
        validate=validate.OneOf(
            SUPPORTED_MODELS, error="must be one of: " + ", ".join(SUPPORTED_MODELS)
        ),
    )
    webhook_url = fields.Url(schemes={"http", "https"}, require_tld=False)
    webhook_events = fields.List(
        fields.String(
            validate=validate.OneOf(EVENT_TYPES, error="must be one of: " + ", ".join(EVENT_TYPES))
        ),
        validate=validate.Length(min=1),
    )
    metadata = fields.Dict(keys=fields.String(), load_default=dict)

    @validates("metadata")
    def _metadata_size(self, value: dict[str, Any], **_kwargs: Any) -> None:
        if len(json.dumps(value, separators=(",", ":")).encode()) > MAX_METADATA_BYTES:
            raise ValidationError(f"must be at most {MAX_METADATA_BYTES} bytes as JSON")

    @validates_schema
    def _guidance_order(self, data: dict[str, Any], **_kwargs: Any) -> None:
        low, high = data.get("min_guidance_scale"), data.get("max_guidance_scale")
        if low is not None and high is not None and low > high:
            raise ValidationError(
                "must not be greater than max_guidance_scale", "min_guidance_scale"
            )


class UpstreamStateSchema(Schema):
    id = fields.String(allow_none=True)
    status = fields.String(allow_none=True)
    eta = fields.Float(allow_none=True)


class OutputSchema(Schema):
    url = fields.String(allow_none=True)
    source_url = fields.String()
    content_type = fields.String(allow_none=True)
    bytes = fields.Integer(allow_none=True)
    sha256 = fields.String(allow_none=True)
    stored = fields.Boolean()
    error = fields.String(
        allow_none=True, metadata={"description": "Why the output is not stored (if it is not)"}
    )


class JobErrorSchema(Schema):
    code = fields.String()
    message = fields.String()


class JobSchema(Schema):
    id = fields.String()
    status = fields.String(metadata={"enum": list(JOB_STATUSES)})
    model_id = fields.String()
    input = fields.Dict()
    metadata = fields.Dict()
    webhook_url = fields.String(allow_none=True)
    webhook_events = fields.List(fields.String(), allow_none=True)
    created_at = fields.String()
    updated_at = fields.String()
    completed_at = fields.String(allow_none=True)
    queue_position = fields.Integer(
        allow_none=True,
        metadata={
            "description": "1-based place among jobs waiting for a free ModelsLab slot; "
            "null once submitted (or finished)"
        },
    )
    upstream = fields.Nested(UpstreamStateSchema)
    outputs = fields.List(fields.Nested(OutputSchema))
    error = fields.Nested(JobErrorSchema, allow_none=True)


class JobListArgs(Schema):
    class Meta:
        unknown = RAISE

    status = fields.String(
        validate=validate.OneOf(JOB_STATUSES, error="must be one of: " + ", ".join(JOB_STATUSES))
    )
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    cursor = fields.String(validate=validate.Length(max=200))


class JobPageSchema(Schema):
    items = fields.List(fields.Nested(JobSchema))
    next_cursor = fields.String(allow_none=True)
