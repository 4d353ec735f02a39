"""Fault-injection knobs of the ModelsLab simulator, settable at runtime."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from marshmallow import RAISE, Schema, fields, validate

OUTPUT_TYPES = ("mp4", "gif")
_NON_NEGATIVE = validate.Range(min=0)


@dataclass
class SimulatorKnobs:
    """How the simulator behaves; each job follows the knobs in force when it was submitted."""

    #: Seconds between the submit and the callback; rendering time counts in it.
    delay: float = 1.0
    #: The ``eta`` reported in ``processing`` answers.
    eta: int = 5
    #: Extra copies of each callback (ModelsLab may call back more than once).
    duplicate_callbacks: int = 0
    #: Never send the callback; the job is only visible through fetch.
    drop_callback: bool = False
    #: Render synchronously and answer ``success`` straight away.
    immediate_success: bool = False
    #: With ``immediate_success``, still send the callback (unless dropped).
    callback_on_immediate: bool = True
    #: Generation ends in a ``failed`` callback.
    fail_generation: bool = False
    #: The next N submits answer HTTP 200 ``{"status": "error"}``.
    error_next: int = 0
    #: The next N submits answer HTTP 429 with ``retry_after``.
    rate_limit_next: int = 0
    #: The ``retry_after`` of simulated 429 answers, in seconds.
    rate_limit_retry_after: int = 1
    #: Answer 429 while this many jobs of one account (one key) are processing, like
    #: ModelsLab's queue limit (0: off).
    max_queued: int = 5
    #: Slots of that limit held, on every account, by another program sharing it.
    held_slots: int = 0
    #: The next N submits answer HTTP 500.
    server_error_next: int = 0
    #: The first N requests of each output answer 404 (future links not ready yet).
    future_link_404s: int = 0
    #: Send the callback before answering the submit (the race ModelsLab can produce).
    callback_before_response: bool = False
    #: Render this type whatever the request asked for (``mp4`` or ``gif``).
    output_type_override: str | None = None
    #: Timeout of each callback POST, in seconds.
    callback_timeout: float = 10.0

    def as_dict(self) -> dict[str, Any]:
        """Return the knobs as a JSON-ready dict."""
        return dataclasses.asdict(self)

    def updated(self, changes: Mapping[str, Any]) -> SimulatorKnobs:
        """Return a copy with ``changes`` validated and applied (raises ``ValidationError``)."""
        loaded: dict[str, Any] = KNOBS_SCHEMA.load(changes, partial=True)
        return dataclasses.replace(self, **loaded)


class KnobsSchema(Schema):
    """Wire shape of ``PUT /_sim/knobs``: a partial update, unknown names rejected."""

    class Meta:
        unknown = RAISE

    delay = fields.Float(validate=_NON_NEGATIVE)
    eta = fields.Integer(strict=True, validate=_NON_NEGATIVE)
    duplicate_callbacks = fields.Integer(strict=True, validate=_NON_NEGATIVE)
    drop_callback = fields.Boolean()
    immediate_success = fields.Boolean()
    callback_on_immediate = fields.Boolean()
    fail_generation = fields.Boolean()
    error_next = fields.Integer(strict=True, validate=_NON_NEGATIVE)
    rate_limit_next = fields.Integer(strict=True, validate=_NON_NEGATIVE)
    rate_limit_retry_after = fields.Integer(strict=True, validate=_NON_NEGATIVE)
    max_queued = fields.Integer(strict=True, validate=_NON_NEGATIVE)
    held_slots = fields.Integer(strict=True, validate=_NON_NEGATIVE)
    server_error_next = fields.Integer(strict=True, validate=_NON_NEGATIVE)
    future_link_404s = fields.Integer(strict=True, validate=_NON_NEGATIVE)
    callback_before_response = fields.Boolean()
    output_type_override = fields.String(allow_none=True, validate=validate.OneOf(OUTPUT_TYPES))
    callback_timeout = fields.Float(validate=validate.Range(min=0, min_inclusive=False))


KNOBS_SCHEMA = KnobsSchema()
