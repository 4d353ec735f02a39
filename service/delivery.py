"""Delivering one event to one target, by the policy of DESIGN §3.

A delivery thread renders the message for the channel, sends it once over the
worker's SSRF-guarded session, records the attempt, and then settles the
delivery: delivered, retried later (schedule with jitter, ``Retry-After``
honoured), failed, or failed permanently (which disables the subscription).
"""

from __future__ import annotations

import logging
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from sqlalchemy.orm import Session

from service.extension import Services
from service.models import Delivery, DeliveryAttempt, Event, Subscription, utcnow
from service.notifiers import render_message
from service.notifiers.policy import AttemptResult, next_attempt_delay, send

log = logging.getLogger("motionhook.delivery")

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
SLACK_PACE = 1.0


def active_secrets(sub: Subscription, now: datetime) -> list[str]:
    """The subscription's secret, plus the previous one while its 24 h overlap lasts."""
    secrets = [sub.secret] if sub.secret else []
    expires = sub.previous_secret_expires_at
    if sub.previous_secret and expires is not None and expires > now:
        secrets.append(sub.previous_secret)
    return secrets


def disable_subscription(sub: Subscription, reason: str, now: datetime) -> None:
    sub.enabled = False
    sub.disabled_reason = reason[:500]
    sub.updated_at = now


class Deliverer:
    """Sends claimed deliveries; one instance per worker, shared by its threads."""

    def __init__(self, services: Services, session: requests.Session, owner: str) -> None:
        self.services = services
        self.settings = services.settings
        self.db = services.db
        self.http = session
        self.owner = owner
        self.rng = random.Random()

    def deliver(self, delivery_id: str) -> None:
        """Make one attempt at a claimed delivery and settle it."""
        prepared = self._prepare(delivery_id)
        if prepared is None:
            return
        kind, url, envelope, secrets = prepared
        message = render_message(kind, envelope, secrets=secrets)
        result = send(
            self.http,
            url,
            message,
            kind=kind,
            timeout=self.settings.delivery_timeout,
            now=lambda: datetime.now(UTC),
        )
        self._settle(delivery_id, result)

    def _prepare(self, delivery_id: str) -> tuple[str, str, dict[str, Any], list[str]] | None:
        now = utcnow()
        with self.db.transaction() as session:
            delivery = session.get(Delivery, delivery_id)
            if delivery is None or delivery.status != PENDING or delivery.lease_owner != self.owner:
                return None
            event = session.get(Event, delivery.event_id)
            assert event is not None
            if delivery.subscription_id is None:
                return (
                    delivery.kind,
                    delivery.target_url or "",
                    event.payload,
                    [self.settings.webhook_secret],
                )
            sub = session.get(Subscription, delivery.subscription_id, with_for_update=True)
            if sub is None or not sub.enabled:
                reason = (
                    "subscription deleted"
                    if sub is None
                    else (f"subscription disabled: {sub.disabled_reason or 'by request'}")
                )
                self._fail(delivery, reason, now)
                return None
            if sub.next_send_at is not None and sub.next_send_at > now:
                # Paced (Slack 1/s, Discord's rate limit): wait for the slot, no attempt.
                delivery.due_at = sub.next_send_at
                delivery.lease_owner = None
                return None
            if sub.kind == "slack":
                sub.next_send_at = now + timedelta(seconds=SLACK_PACE)
            return sub.kind, sub.url, event.payload, active_secrets(sub, now)

    def _fail(self, delivery: Delivery, reason: str, now: datetime) -> None:
        delivery.status = FAILED
        delivery.last_error = reason[:1000]
        delivery.lease_owner = None
        delivery.due_at = None
        delivery.updated_at = now

    def _settle(self, delivery_id: str, result: AttemptResult) -> None:
        now = utcnow()
        with self.db.transaction() as session:
            delivery = session.get(Delivery, delivery_id, with_for_update=True)
            if delivery is None:
                return
            session.add(
                DeliveryAttempt(
                    delivery_id=delivery_id,
                    attempted_at=now,
                    status_code=result.status,
                    latency_ms=round(result.latency_ms, 2),
                    error=result.error,
                    response_excerpt=result.response_excerpt,
                    outcome=result.outcome.result,
                )
            )
            delivery.attempt_count += 1
            delivery.last_status_code = result.status
            delivery.updated_at = now
            sub = (
                session.get(Subscription, delivery.subscription_id, with_for_update=True)
                if delivery.subscription_id
                else None
            )
            self._apply_outcome(session, delivery, sub, result, now)
        log.info(
            "delivery attempt",
            extra={
                "delivery_id": delivery_id,
                "outcome": result.outcome.result,
                "http_status": result.status,
                "latency_ms": round(result.latency_ms, 1),
                "subscription_id": delivery.subscription_id,
                "job_id": delivery.job_id,
            },
        )

    def _apply_outcome(
        self,
        session: Session,
        delivery: Delivery,
        sub: Subscription | None,
        result: AttemptResult,
        now: datetime,
    ) -> None:
        outcome = result.outcome
        if sub is not None and result.pacing > 0:
            paced = now + timedelta(seconds=result.pacing)
            if sub.next_send_at is None or sub.next_send_at < paced:
                sub.next_send_at = paced
        if outcome.result == "delivered":
            delivery.status = DELIVERED
            delivery.delivered_at = now
            delivery.due_at = None
            delivery.lease_owner = None
            delivery.last_error = None
            if sub is not None:
                sub.failing_since = None
            return
        if outcome.result == "retry":
            delay = next_attempt_delay(
                self.settings.retry_schedule,
                delivery.attempt_count,
                retry_after=outcome.retry_after,
                rng=self.rng,
            )
            if delay is None:
                self._fail(
                    delivery,
                    f"gave up after {delivery.attempt_count} attempts: {outcome.reason}",
                    now,
                )
            else:
                delivery.due_at = now + timedelta(seconds=delay)
                delivery.lease_owner = None
                delivery.last_error = outcome.reason[:1000]
        else:
            self._fail(delivery, outcome.reason, now)
        if sub is None:
            return
        if outcome.result == "permanent":
            disable_subscription(sub, outcome.reason, now)
            return
        if sub.failing_since is None:
            sub.failing_since = now
        elif (now - sub.failing_since).total_seconds() >= self.settings.disable_after:
            disable_subscription(
                sub,
                f"failing without a success since {sub.failing_since.isoformat()}",
                now,
            )
