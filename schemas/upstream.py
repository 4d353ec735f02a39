"""ModelsLab img2video request, response and callback shapes.

The parameter schema enforces ModelsLab's documented limits. The response schema
is deliberately tolerant: ModelsLab sends ``id`` as int or str, ``output`` as a
list or an (empty) string, ``message`` or ``messege``, ``error`` or ``failed``,
and ``track_id`` at the top level or inside ``meta``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, pre_load, validate

SUPPORTED_MODELS = ("wan2.2", "ltx-2.3")
OUTPUT_TYPES = ("mp4", "gif")
# Seconds beyond which an eta, retry_after or generationTime is nonsense: such a value
# is dropped (as if absent) rather than overflowing the date arithmetic built on it.
MAX_SECONDS = 366 * 24 * 3600


class UpstreamStatus(StrEnum):
    """What ModelsLab says of a generation (``upstream.status`` of the job resource)."""

    SUCCESS = "success"
    PROCESSING = "processing"
    FAILED = "failed"  # ModelsLab's "error" and "failed" alike


class Img2VideoParams(Schema):
    """Generation parameters a client may set, with ModelsLab's limits."""

    prompt = fields.String(
        validate=validate.Length(max=4000),
        metadata={"description": "What should happen in the video.", "example": "a slow zoom"},
    )
    negative_prompt = fields.String(
        validate=validate.Length(max=4000),
        metadata={"description": "What the video should avoid.", "example": "blurry, low quality"},
    )
    height = fields.Integer(
        validate=validate.Range(min=64, max=512),
        metadata={"description": "Output height in pixels (64 to 512).", "example": 512},
    )
    width = fields.Integer(
        validate=validate.Range(min=64, max=512),
        metadata={"description": "Output width in pixels (64 to 512).", "example": 512},
    )
    num_frames = fields.Integer(
        validate=validate.Range(min=1, max=25),
        metadata={
            "description": "Frames to generate (1 to 25; ModelsLab's default 16).",
            "example": 16,
        },
    )
    num_inference_steps = fields.Integer(
        validate=validate.Range(min=1, max=50),
        metadata={"description": "Denoising steps (1 to 50; default 20).", "example": 20},
    )
    min_guidance_scale = fields.Float(
        validate=validate.Range(min=1, max=8),
        metadata={"description": "Lowest guidance scale (1 to 8; default 1).", "example": 1},
    )
    max_guidance_scale = fields.Float(
        validate=validate.Range(min=1, max=8),
        metadata={"description": "Highest guidance scale (1 to 8; default 3).", "example": 3},
    )
    motion_bucket_id = fields.Integer(
        validate=validate.Range(min=1, max=255),
        metadata={"description": "How much motion (1 to 255; default 127).", "example": 127},
    )
    noise_aug_strength = fields.Float(
        validate=validate.Range(min=0, max=1),
        metadata={"description": "Noise added to the input image (0 to 1).", "example": 0.02},
    )
    fps = fields.Integer(
        validate=validate.Range(min=1, max=16),
        metadata={"description": "Frames per second of the output (1 to 16).", "example": 8},
    )
    output_type = fields.String(
        validate=validate.OneOf(OUTPUT_TYPES),
        metadata={"description": "Container of the output video.", "example": "mp4"},
    )
    temp = fields.Boolean(
        metadata={
            "description": "Use ModelsLab's temporary storage (wiped every 24 h; motionhook "
            "keeps its own copy either way).",
            "example": False,
        }
    )


class _Flexible(fields.Field[Any]):
    """Accept whatever ModelsLab sends; normalization happens in ``pre_load``."""


@dataclass(frozen=True)
class UpstreamResult:
    """One normalized ModelsLab answer: submit response, fetch response or callback."""

    status: str
    upstream_id: str | None = None
    output: list[str] = field(default_factory=list)
    future_links: list[str] = field(default_factory=list)
    eta: float | None = None
    fetch_result: str | None = None
    message: str | None = None
    track_id: str | None = None
    retry_after: float | None = None
    generation_time: float | None = None


def _as_url_list(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(item) for item in value if isinstance(item, str) and item]
    return []


class UpstreamResponse(Schema):
    """A ModelsLab response or callback, normalized into :class:`UpstreamResult`."""

    class Meta:
        unknown = EXCLUDE

    status = fields.String(required=True, validate=validate.Length(min=1, max=16))
    id = fields.String(allow_none=True, validate=validate.Length(max=64))
    output = _Flexible(load_default=list)
    future_links = _Flexible(load_default=list)
    eta = fields.Float(allow_none=True)
    fetch_result = fields.String(allow_none=True)
    message = fields.String(allow_none=True)
    track_id = fields.String(allow_none=True)
    retry_after = fields.Float(allow_none=True)
    generationTime = fields.Float(allow_none=True)  # noqa: N815 - upstream's name

    @pre_load
    def _normalize(self, data: Any, **_kwargs: Any) -> Any:
        if not isinstance(data, dict):
            raise ValidationError("body must be a JSON object")
        data = dict(data)
        upstream_id = data.get("id")
        if isinstance(upstream_id, int | float) and not isinstance(upstream_id, bool):
            if not math.isfinite(upstream_id):
                raise ValidationError("must be a finite number", "id")
            data["id"] = str(int(upstream_id))
        if "message" not in data and "messege" in data:
            data["message"] = data["messege"]
        for name in ("message", "fetch_result", "track_id"):
            if name in data and data[name] is not None and not isinstance(data[name], str):
                data[name] = str(data[name])
        meta = data.get("meta")
        if not data.get("track_id") and isinstance(meta, dict) and meta.get("track_id"):
            data["track_id"] = str(meta["track_id"])
        for name in ("eta", "retry_after", "generationTime"):
            value = data.get(name)
            if (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not 0 <= value <= MAX_SECONDS
            ):
                data.pop(name, None)
        status = data.get("status")
        data["status"] = str(status).strip().lower() if status is not None else status
        return {key: data[key] for key in self.fields if key in data}

    @post_load
    def _build(self, data: dict[str, Any], **_kwargs: Any) -> UpstreamResult:
        status = data["status"]
        if status == "error":
            status = UpstreamStatus.FAILED
        return UpstreamResult(
            status=status,
            upstream_id=data.get("id"),
            output=_as_url_list(data.get("output")),
            future_links=_as_url_list(data.get("future_links")),
            eta=data.get("eta"),
            fetch_result=data.get("fetch_result"),
            message=data.get("message"),
            track_id=data.get("track_id"),
            retry_after=data.get("retry_after"),
            generation_time=data.get("generationTime"),
        )


UPSTREAM_RESPONSE = UpstreamResponse()
