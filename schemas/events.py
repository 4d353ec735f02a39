"""The event envelope and the queries of ``/v1/events`` and its streams."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields, validate

from schemas.jobs import EVENT_TYPES

ALL_EVENT_TYPES = (*EVENT_TYPES, "test.ping")
EVENT_ID_DOC = {
    "description": "The event id (the webhook-id header of its deliveries)",
    "example": "evt_kerdsrgbtlkqrxixudeusyif",
}

_type = fields.String(
    validate=validate.OneOf(ALL_EVENT_TYPES, error="must be one of: " + ", ".join(ALL_EVENT_TYPES)),
    metadata={"description": "Only events of this type", "example": "job.completed"},
)
_job_id = fields.String(
    validate=validate.Length(max=40), metadata={"description": "Only this job's events"}
)


class EventStreamArgs(Schema):
    class Meta:
        unknown = RAISE

    type = _type
    job_id = _job_id


class EventListArgs(EventStreamArgs):
    after = fields.String(
        validate=validate.Length(max=40),
        metadata={
            "description": "An event id: only events after it. Pass the id of the last event "
            "you processed (or next_cursor) to read what you missed."
        },
    )
    limit = fields.Integer(
        load_default=50,
        validate=validate.Range(min=1, max=200),
        metadata={"description": "Page size (1 to 200)", "example": 50},
    )


class EventSchema(Schema):
    id = fields.String(metadata=EVENT_ID_DOC)
    type = fields.String(
        metadata={
            "description": "What happened",
            "enum": list(ALL_EVENT_TYPES),
            "example": "job.completed",
        }
    )
    created_at = fields.String(
        metadata={"description": "RFC 3339", "example": "2026-01-01T12:00:14Z"}
    )
    data = fields.Dict(
        metadata={
            "description": "The job resource (test.ping: a message)",
            "example": {"id": "job_ea2b7kxpg7m357qztnh2jhg3", "status": "completed"},
        }
    )


class EventPageSchema(Schema):
    items = fields.List(
        fields.Nested(EventSchema), metadata={"description": "Events, oldest first"}
    )
    next_cursor = fields.String(
        allow_none=True,
        metadata={
            "description": "Pass as after for the next page; null: no more right now",
            "example": "evt_kerdsrgbtlkqrxixudeusyif",
        },
    )
