"""Operator endpoints: draining due work inside a request."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields, validate

# Below gunicorn's default 30 s request timeout; Cloud Run allows up to an hour.
DEFAULT_DRAIN_SECONDS = 25.0
MAX_DRAIN_SECONDS = 3600.0


class DrainQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    max_seconds = fields.Float(
        load_default=DEFAULT_DRAIN_SECONDS,
        allow_nan=False,
        validate=validate.Range(min=0, max=MAX_DRAIN_SECONDS, min_inclusive=False),
        metadata={
            "description": "Answer within this long: no claims after it, and work still "
            "in flight then is handed back (its lease freed for the next drain)"
        },
    )


class DrainReportSchema(Schema):
    ran = fields.Dict(
        keys=fields.String(),
        values=fields.Integer(),
        metadata={
            "description": "Items run to the end, per kind of work (submit, task, delivery)",
            "example": {"submit": 2, "task": 1, "delivery": 5},
        },
    )
    released = fields.Integer(
        metadata={"description": "Leases handed back unfinished", "example": 0}
    )
    budget_exhausted = fields.Boolean(
        metadata={
            "description": "True: time ran out while work was due; call again",
            "example": False,
        }
    )
    seconds = fields.Float(metadata={"description": "How long the drain ran", "example": 3.2})
