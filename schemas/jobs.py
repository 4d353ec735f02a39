"""motionhook's job resource and the body of ``POST /v1/jobs``."""

from __future__ import annotations

import json
from typing import Any

from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    fields,
    pre_load,
    validate,
    validates,
    validates_schema,
)

from schemas.strict_json import find_problems
from schemas.upstream import SUPPORTED_MODELS, Img2VideoParams

JOB_STATUSES = ("queued", "processing", "completed", "failed")
EVENT_TYPES = ("job.processing", "job.completed", "job.failed")
MAX_METADATA_BYTES = 4096
MAX_INIT_IMAGE_LENGTH = 2048


class BoundedUrl(fields.Url):
    """A URL whose length is checked first: the URL pattern is slow on megabytes of host."""

    def __init__(self, *, max_length: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_length = max_length

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, str) and len(value) > self.max_length:
            raise ValidationError(f"must be at most {self.max_length} characters")
        return super()._deserialize(value, attr, data, **kwargs)


# Served by every motionhook (``service/static``), so examples work against ``make run``.
SAMPLE_IMAGE_URL = "http://127.0.0.1:8000/static/sample.png"


class JobCreateSchema(Img2VideoParams):
    """What a client may send; the upstream key, webhook and track_id are ours."""

    class Meta:
        unknown = RAISE

    init_image = BoundedUrl(
        schemes={"http", "https"},
        require_tld=False,
        max_length=MAX_INIT_IMAGE_LENGTH,
        metadata={
            "description": "The picture to animate: an http(s) URL ModelsLab can fetch without "
            "redirects (at most 2,048 characters). Or send a multipart form with the file in "
            "field `image` instead.",
            "example": SAMPLE_IMAGE_URL,
        },
    )
    model_id = fields.String(
        load_default="wan2.2",
        validate=validate.OneOf(
            SUPPORTED_MODELS, error="must be one of: " + ", ".join(SUPPORTED_MODELS)
        ),
        metadata={"description": "The ModelsLab model.", "example": "wan2.2"},
    )
    webhook_url = fields.Url(
        schemes={"http", "https"},
        require_tld=False,
        metadata={
            "description": "Optional: also POST this job's events here, signed with "
            "MOTIONHOOK_WEBHOOK_SECRET (Standard Webhooks headers).",
            "example": "https://example.com/hooks/motionhook",
        },
    )
    webhook_events = fields.List(
        fields.String(
            validate=validate.OneOf(EVENT_TYPES, error="must be one of: " + ", ".join(EVENT_TYPES))
        ),
        validate=validate.Length(min=1),
        metadata={
            "description": "Which events go to webhook_url (default: all of them).",
            "example": ["job.completed", "job.failed"],
        },
    )
    metadata = fields.Dict(
        keys=fields.String(),
        load_default=dict,
        metadata={
            "description": "Your own data, echoed in the job and its events (at most 4 KB).",
            "example": {"order": "1234"},
        },
    )

    @pre_load
    def _refuse_unstorable(self, data: Any, **_kwargs: Any) -> Any:
        """Refuse NUL characters and non-finite numbers in any field (multipart forms too)."""
        if isinstance(data, dict):
            problems = find_problems(data)
            if problems:
                raise ValidationError({path: [reason] for path, reason in problems.items()})
        return data

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
    id = fields.String(
        allow_none=True,
        metadata={"description": "ModelsLab's id of the job", "example": "91827364"},
    )
    status = fields.String(
        allow_none=True, metadata={"description": "ModelsLab's last status", "example": "success"}
    )
    eta = fields.Float(
        allow_none=True, metadata={"description": "ModelsLab's estimate, seconds", "example": 12.0}
    )


class OutputSchema(Schema):
    url = fields.String(
        allow_none=True,
        metadata={
            "description": "Durable, signed URL of motionhook's copy",
            "example": "http://127.0.0.1:8000/media/outputs/job_ea2b7kxpg7m357qztnh2jhg3/0.mp4"
            "?exp=1767268800&sig=Vb3kq9Xz",
        },
    )
    source_url = fields.String(
        metadata={
            "description": "ModelsLab's (short-lived) URL",
            "example": "https://pub-example.r2.dev/generations/91827364.mp4",
        }
    )
    content_type = fields.String(
        allow_none=True,
        metadata={"description": "Media type of the stored copy", "example": "video/mp4"},
    )
    bytes = fields.Integer(
        allow_none=True, metadata={"description": "Size of the stored copy", "example": 46906}
    )
    sha256 = fields.String(
        allow_none=True,
        metadata={
            "description": "Hex SHA-256 of the copy",
            "example": "7c176697bfd1e8a4c2b9f0d3e5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4",
        },
    )
    stored = fields.Boolean(
        metadata={"description": "Whether motionhook holds a copy", "example": True}
    )
    error = fields.String(
        allow_none=True,
        metadata={"description": "Why the output is not stored (if it is not)", "example": None},
    )


class JobErrorSchema(Schema):
    code = fields.String(
        metadata={
            "description": "upstream_error, upstream_rejected, timeout, …",
            "example": "upstream_error",
        }
    )
    message = fields.String(
        metadata={
            "description": "What went wrong, for people",
            "example": "ModelsLab reported the generation failed",
        }
    )


class JobSourceSchema(Schema):
    """Where a chat job was asked for; null for jobs made over the API."""

    kind = fields.String(
        metadata={"description": "The chat app", "enum": ["discord", "slack"], "example": "slack"}
    )
    workspace = fields.String(
        allow_none=True,
        metadata={"description": "Slack team or Discord guild id", "example": "T024BE7LD"},
    )
    channel = fields.String(
        allow_none=True, metadata={"description": "Channel id", "example": "C024BE91L"}
    )
    user = fields.String(
        metadata={"description": "Id of the user who asked", "example": "U024BE7LH"}
    )


class JobSchema(Schema):
    id = fields.String(
        metadata={
            "description": "The job id (also the track_id sent to ModelsLab)",
            "example": "job_ea2b7kxpg7m357qztnh2jhg3",
        }
    )
    status = fields.String(
        metadata={
            "enum": list(JOB_STATUSES),
            "description": "Only ever moves forward",
            "example": "completed",
        }
    )
    model_id = fields.String(metadata={"description": "The ModelsLab model", "example": "wan2.2"})
    input = fields.Dict(
        metadata={
            "description": "The generation parameters sent upstream",
            "example": {
                "init_image": SAMPLE_IMAGE_URL,
                "prompt": "a slow zoom over the hills",
                "num_frames": 16,
            },
        }
    )
    metadata = fields.Dict(
        metadata={"description": "Your metadata, as sent", "example": {"order": "1234"}}
    )
    webhook_url = fields.String(
        allow_none=True,
        metadata={
            "description": "Per-job webhook",
            "example": "https://example.com/hooks/motionhook",
        },
    )
    webhook_events = fields.List(
        fields.String(),
        allow_none=True,
        metadata={"description": "Its event filter", "example": ["job.completed", "job.failed"]},
    )
    source = fields.Nested(
        JobSourceSchema,
        allow_none=True,
        metadata={"description": "Where a chat job came from (Slack, Discord); null otherwise"},
    )
    created_at = fields.String(
        metadata={"description": "RFC 3339", "example": "2026-01-01T12:00:00Z"}
    )
    updated_at = fields.String(
        metadata={"description": "RFC 3339", "example": "2026-01-01T12:00:14Z"}
    )
    completed_at = fields.String(
        allow_none=True,
        metadata={"description": "RFC 3339, once done", "example": "2026-01-01T12:00:14Z"},
    )
    queue_position = fields.Integer(
        allow_none=True,
        metadata={
            "description": "1-based place among jobs waiting for a free ModelsLab slot; "
            "null once submitted (or finished)",
            "example": None,
        },
    )
    upstream = fields.Nested(
        UpstreamStateSchema, metadata={"description": "What ModelsLab last said about the job"}
    )
    outputs = fields.List(
        fields.Nested(OutputSchema),
        metadata={"description": "The generated videos (one), once completed"},
    )
    error = fields.Nested(
        JobErrorSchema, allow_none=True, metadata={"description": "Set when status is failed"}
    )


class JobListArgs(Schema):
    class Meta:
        unknown = RAISE

    status = fields.String(
        validate=validate.OneOf(JOB_STATUSES, error="must be one of: " + ", ".join(JOB_STATUSES)),
        metadata={"description": "Only jobs in this status", "example": "completed"},
    )
    limit = fields.Integer(
        load_default=20,
        validate=validate.Range(min=1, max=100),
        metadata={"description": "Page size (1 to 100)", "example": 20},
    )
    cursor = fields.String(
        validate=validate.Length(max=200),
        metadata={"description": "The next_cursor of the previous page"},
    )


class JobPageSchema(Schema):
    items = fields.List(fields.Nested(JobSchema), metadata={"description": "Jobs, newest first"})
    next_cursor = fields.String(
        allow_none=True,
        metadata={"description": "Pass as cursor for the next page; null: last", "example": None},
    )
