"""Subscriptions (fan-out targets) and deliveries, as clients see them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from schemas.destinations import BROKER_KINDS, parse_destination
from schemas.events import EVENT_ID_DOC
from schemas.jobs import EVENT_TYPES

HTTP_KINDS = ("slack", "discord", "webhook")
KINDS = (*HTTP_KINDS, *BROKER_KINDS)
DELIVERY_STATUSES = ("pending", "delivered", "failed")
# A subscription may name every event type; by default it gets the job events.
SUBSCRIPTION_EVENT_TYPES = (*EVENT_TYPES, "test.ping")

URL_DOC = {
    "description": "Receiver URL (Slack/Discord incoming-webhook URL, or your endpoint). "
    "Private and loopback addresses are refused unless MOTIONHOOK_ALLOW_PRIVATE_TARGETS=1 "
    "(the default of `make run`).",
    "example": "http://127.0.0.1:9000/hooks",
}
EVENTS_DOC = {
    "description": "Event types to deliver (default: all).",
    "example": ["job.completed", "job.failed"],
}
DESCRIPTION_DOC = {"description": "Your note about this target.", "example": "staging receiver"}
CREATED_AT_DOC = {
    "description": "When it was created (RFC 3339)",
    "example": "2026-01-01T12:00:00Z",
}
UPDATED_AT_DOC = {
    "description": "When it last changed (RFC 3339)",
    "example": "2026-01-01T12:00:05Z",
}
DELIVERY_ID_DOC = {"description": "The delivery id", "example": "dlv_rtlktymylqudz6rxj47a35sv"}
JOB_ID_DOC = {"description": "The job id", "example": "job_ea2b7kxpg7m357qztnh2jhg3"}
ENABLED_DOC = {
    "description": "false stops deliveries; true re-enables and clears the failure streak.",
    "example": True,
}

_event_type = fields.String(
    validate=validate.OneOf(
        SUBSCRIPTION_EVENT_TYPES, error="must be one of: " + ", ".join(SUBSCRIPTION_EVENT_TYPES)
    )
)


class SubscriptionCreateSchema(Schema):
    class Meta:
        unknown = RAISE

    kind = fields.String(
        required=True,
        validate=validate.OneOf(KINDS, error="must be one of: " + ", ".join(KINDS)),
        metadata={"description": "Where events go: " + ", ".join(KINDS), "example": "webhook"},
    )
    # http(s) for slack, discord and webhook; a broker URL for the others (checked below).
    url = fields.String(required=True, validate=validate.Length(min=1, max=2000), metadata=URL_DOC)
    events = fields.List(
        _event_type,
        load_default=lambda: list(EVENT_TYPES),
        validate=validate.Length(min=1),
        metadata=EVENTS_DOC,
    )
    description = fields.String(
        load_default="", validate=validate.Length(max=500), metadata=DESCRIPTION_DOC
    )
    enabled = fields.Boolean(load_default=True, metadata=ENABLED_DOC)

    @validates_schema
    def _url_fits_kind(self, data: dict[str, Any], **_kwargs: Any) -> None:
        if "kind" in data and "url" in data:
            check_url(data["kind"], data["url"])


_HTTP_URL = fields.Url(schemes={"http", "https"}, require_tld=False)


def check_url(kind: str, url: str) -> None:
    """Raise a ValidationError on ``url`` unless it is the URL shape ``kind`` needs."""
    if kind in BROKER_KINDS:
        try:
            parse_destination(kind, url)
        except ValueError as exc:
            raise ValidationError(str(exc), field_name="url") from None
        return
    try:
        _HTTP_URL.deserialize(url)
    except ValidationError as exc:
        raise ValidationError(exc.messages, field_name="url") from None


class SubscriptionUpdateSchema(Schema):
    class Meta:
        unknown = RAISE

    # Checked against the subscription's kind by the view (see ``check_url``).
    url = fields.String(validate=validate.Length(min=1, max=2000), metadata=URL_DOC)
    events = fields.List(_event_type, validate=validate.Length(min=1), metadata=EVENTS_DOC)
    description = fields.String(validate=validate.Length(max=500), metadata=DESCRIPTION_DOC)
    enabled = fields.Boolean(metadata=ENABLED_DOC)


class SubscriptionSchema(Schema):
    id = fields.String(
        metadata={"description": "The subscription id", "example": "sub_gujovry5eb2fuldtq5xremjt"}
    )
    kind = fields.String(
        metadata={"description": "Where events go", "enum": list(KINDS), "example": "webhook"}
    )
    url = fields.String(
        metadata={
            "description": "The receiver; Slack and Discord URLs (which are secrets) and broker "
            "passwords are shown whole only on create",
            "example": "http://127.0.0.1:9000/hooks",
        }
    )
    events = fields.List(fields.String(), metadata=EVENTS_DOC)
    description = fields.String(metadata=DESCRIPTION_DOC)
    enabled = fields.Boolean(
        metadata={"description": "false: no deliveries are made", "example": True}
    )
    disabled_reason = fields.String(
        allow_none=True,
        metadata={
            "description": "Why motionhook disabled it (e.g. the receiver answered 410); null "
            "while enabled or when disabled by you",
            "example": None,
        },
    )
    created_at = fields.String(metadata=CREATED_AT_DOC)
    updated_at = fields.String(metadata=UPDATED_AT_DOC)
    secret = fields.String(
        metadata={
            "description": "Signing secret of a webhook subscription; only on create and "
            "rotate-secret",
            "example": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        }
    )


class SubscriptionListSchema(Schema):
    items = fields.List(
        fields.Nested(SubscriptionSchema),
        metadata={"description": "The project's subscriptions, newest first"},
    )


def _representable(value: datetime) -> None:
    """Refuse instants that cannot be stored as UTC (e.g. year 1 with a positive offset)."""
    try:
        in_utc = value.astimezone(UTC)
    except OverflowError:
        raise ValidationError("is out of range") from None
    if in_utc.year < 1970:
        raise ValidationError("must be after 1970-01-01T00:00:00Z")


class RecoverSchema(Schema):
    class Meta:
        unknown = RAISE

    since = fields.AwareDateTime(
        required=True,
        default_timezone=None,
        validate=_representable,
        metadata={
            "description": "Replay failed deliveries created at or after this instant (RFC 3339)",
            "example": "2026-01-01T00:00:00Z",
        },
    )


class RecoverResultSchema(Schema):
    recovered = fields.Integer(
        metadata={"description": "How many deliveries were queued", "example": 3}
    )


class TestSentSchema(Schema):
    event_id = fields.String(metadata=EVENT_ID_DOC)
    delivery_id = fields.String(metadata=DELIVERY_ID_DOC)


class AttemptSchema(Schema):
    attempted_at = fields.String(
        metadata={"description": "When it was sent (RFC 3339)", "example": "2026-01-01T12:00:01Z"}
    )
    status_code = fields.Integer(
        allow_none=True,
        metadata={"description": "The receiver's HTTP status; null: no answer", "example": 200},
    )
    latency_ms = fields.Float(
        metadata={"description": "From sending to the answer, milliseconds", "example": 42.5}
    )
    error = fields.String(
        allow_none=True,
        metadata={"description": "Why it failed, when it did", "example": None},
    )
    response_excerpt = fields.String(
        allow_none=True,
        metadata={"description": "The first bytes of the answer's body", "example": "ok"},
    )
    outcome = fields.String(
        metadata={
            "description": "delivered; retry (another attempt follows unless the schedule "
            "is spent); failed (refused, no retry); permanent (refused, and the subscription is "
            "disabled)",
            "example": "delivered",
        }
    )


# A delivery without an event: the Discord "queued, position N" edit of a chat job.
NO_EVENT = (
    "; null for a chat reply that is no event: the edit of a Discord request that says "
    "where its job waits for a ModelsLab slot"
)


class DeliverySchema(Schema):
    id = fields.String(metadata=DELIVERY_ID_DOC)
    event_id = fields.String(
        allow_none=True,
        metadata={**EVENT_ID_DOC, "description": EVENT_ID_DOC["description"] + NO_EVENT},
    )
    event_type = fields.String(
        allow_none=True,
        metadata={
            "description": "The event's type" + NO_EVENT,
            "enum": [*SUBSCRIPTION_EVENT_TYPES, None],
            "example": "job.completed",
        },
    )
    subscription_id = fields.String(
        allow_none=True,
        metadata={
            "description": "Its subscription; null for a job's own webhook_url",
            "example": "sub_gujovry5eb2fuldtq5xremjt",
        },
    )
    job_id = fields.String(allow_none=True, metadata=JOB_ID_DOC)
    kind = fields.String(
        metadata={
            "description": "The receiver's kind: a subscription's, or slack_reply or "
            "discord_reply for the answer to a chat request",
            "example": "webhook",
        }
    )
    status = fields.String(
        metadata={
            "description": "pending (attempts go on), delivered or failed",
            "enum": list(DELIVERY_STATUSES),
            "example": "delivered",
        }
    )
    attempt_count = fields.Integer(metadata={"description": "Attempts made so far", "example": 1})
    next_attempt_at = fields.String(
        allow_none=True,
        metadata={
            "description": "When the next attempt is due (RFC 3339); null unless pending",
            "example": None,
        },
    )
    last_status_code = fields.Integer(
        allow_none=True,
        metadata={"description": "HTTP status of the last attempt", "example": 200},
    )
    last_error = fields.String(
        allow_none=True, metadata={"description": "Error of the last attempt", "example": None}
    )
    created_at = fields.String(metadata=CREATED_AT_DOC)
    updated_at = fields.String(metadata=UPDATED_AT_DOC)
    delivered_at = fields.String(
        allow_none=True,
        metadata={
            "description": "When it was delivered (RFC 3339)",
            "example": "2026-01-01T12:00:01Z",
        },
    )
    attempts = fields.List(
        fields.Nested(AttemptSchema),
        metadata={"description": "Every attempt, oldest first (GET of one delivery only)"},
    )


class DeliveryListArgs(Schema):
    class Meta:
        unknown = RAISE

    subscription_id = fields.String(
        validate=validate.Length(max=40), metadata={"description": "Only this subscription's"}
    )
    job_id = fields.String(
        validate=validate.Length(max=40), metadata={"description": "Only this job's"}
    )
    status = fields.String(
        validate=validate.OneOf(
            DELIVERY_STATUSES, error="must be one of: " + ", ".join(DELIVERY_STATUSES)
        ),
        metadata={"description": "Only deliveries in this status", "example": "failed"},
    )
    limit = fields.Integer(
        load_default=50,
        validate=validate.Range(min=1, max=200),
        metadata={"description": "Page size (1 to 200)", "example": 50},
    )
    cursor = fields.String(
        validate=validate.Length(max=200),
        metadata={"description": "The next_cursor of the previous page"},
    )


class DeliveryPageSchema(Schema):
    items = fields.List(
        fields.Nested(DeliverySchema), metadata={"description": "Deliveries, newest first"}
    )
    next_cursor = fields.String(
        allow_none=True,
        metadata={"description": "Pass as cursor for the next page; null: last", "example": None},
    )
