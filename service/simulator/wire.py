"""Wire shapes of the simulated ModelsLab API: request schemas and error formatting."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, pre_load, validate

from .knobs import OUTPUT_TYPES

MODEL_IDS = ("wan2.2", "ltx-2.3")
DEFAULT_MODEL_ID = "wan2.2"
_HTTP_SCHEMES = {"http", "https"}


class _LenientText(fields.Field[str]):
    """A string that also takes numbers, as ModelsLab does for ``track_id``."""

    default_error_messages = {"invalid": "Not a valid string."}

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.make_error("invalid")
        return str(value)


class Img2VideoRequestSchema(Schema):
    """Body of ``POST /api/v6/video/img2video``, with ModelsLab's limits and defaults."""

    class Meta:
        unknown = EXCLUDE  # ModelsLab ignores parameters it does not know

    key = fields.String(required=True, validate=validate.Length(min=1))
    model_id = fields.String(load_default=DEFAULT_MODEL_ID)
    init_image = fields.Url(required=True, schemes=_HTTP_SCHEMES, require_tld=False)
    prompt = fields.String(load_default=None, allow_none=True)
    negative_prompt = fields.String(load_default=None, allow_none=True)
    height = fields.Integer(load_default=512, validate=validate.Range(min=16, max=512))
    width = fields.Integer(load_default=512, validate=validate.Range(min=16, max=512))
    num_frames = fields.Integer(load_default=16, validate=validate.Range(min=1, max=25))
    num_inference_steps = fields.Integer(load_default=20, validate=validate.Range(min=1, max=50))
    min_guidance_scale = fields.Float(load_default=1.0, validate=validate.Range(min=1, max=8))
    max_guidance_scale = fields.Float(load_default=3.0, validate=validate.Range(min=1, max=8))
    motion_bucket_id = fields.Integer(load_default=127, validate=validate.Range(min=0))
    noise_aug_strength = fields.Float(load_default=0.02, validate=validate.Range(min=0, max=1))
    fps = fields.Integer(load_default=8, validate=validate.Range(min=1, max=16))
    output_type = fields.String(load_default="mp4", validate=validate.OneOf(OUTPUT_TYPES))
    temp = fields.Boolean(load_default=False)
    seed = fields.Integer(load_default=None, allow_none=True)
    webhook = fields.Url(
        load_default=None, allow_none=True, schemes=_HTTP_SCHEMES, require_tld=False
    )
    track_id = _LenientText(load_default=None, allow_none=True)

    @pre_load
    def _blank_optionals_to_none(self, data: Any, **kwargs: Any) -> Any:
        """Treat ``"webhook": ""`` like an absent webhook, as ModelsLab does."""
        if isinstance(data, Mapping):
            blanks = {name for name in ("webhook", "track_id", "seed") if data.get(name) == ""}
            return {**data, **dict.fromkeys(blanks)}
        return data


class FetchRequestSchema(Schema):
    """Body of ``POST /api/v6/video/fetch/<id>``."""

    class Meta:
        unknown = EXCLUDE

    key = fields.String(required=True, validate=validate.Length(min=1))


IMG2VIDEO_REQUEST = Img2VideoRequestSchema()
FETCH_REQUEST = FetchRequestSchema()


def effective_model_id(model_id: str) -> str:
    """Return the model ModelsLab would run: unknown ids fall back to ``wan2.2``."""
    return model_id if model_id in MODEL_IDS else DEFAULT_MODEL_ID


def describe_validation_error(error: ValidationError) -> str:
    """Flatten marshmallow messages into one line that names each offending field."""
    messages = error.messages
    if not isinstance(messages, dict):
        return " ".join(str(message) for message in _flatten(messages))
    return "; ".join(
        f"{field}: {' '.join(_flatten(detail)).rstrip('.')}"
        for field, detail in sorted(messages.items())
    )


def _flatten(detail: Any) -> list[str]:
    if isinstance(detail, dict):
        return [text for value in detail.values() for text in _flatten(value)]
    if isinstance(detail, list | tuple):
        return [text for value in detail for text in _flatten(value)]
    return [str(detail)]
