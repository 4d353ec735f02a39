"""Subscriptions and deliveries: the domain behind ``/v1/subscriptions`` and ``/v1/deliveries``.

Functions take a session and plain values; the views stay thin.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from schemas.destinations import BROKER_KINDS, mask_destination_url, parse_destination
from service.config import Settings
from service.db import Database
from service.events import add_delivery, new_event
from service.jobs import decode_cursor, encode_cursor_parts, isoformat
from service.models import (
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    Event,
    Project,
    Subscription,
    new_id,
    utcnow,
)
from service.notifiers.brokers import missing_extra
from service.notifiers.webhook import generate_secret
from service.outbound import resolve_destination, validate_target_url

SECRET_OVERLAP = timedelta(hours=24)
WEBHOOK = "webhook"
MASK = "***"
# Kinds whose whole URL is a credential (whoever has it can post to the channel).
SECRET_URL_KINDS = frozenset({"slack", "discord"})
# Kinds whose messages carry Standard Webhooks signatures with the subscription's secret.
SIGNED_KINDS = frozenset({WEBHOOK, *BROKER_KINDS})
# Kinds whose client connects to a host named in the URL (boto3 connects to AWS's own
# endpoint, or MOTIONHOOK_AWS_ENDPOINT_URL, whatever the queue URL says).
HOSTED_KINDS = frozenset({"amqp", "nats", "redis"})


class MissingExtra(ValueError):
    """The client library of a subscription kind is not installed."""


def check_destination(kind: str, url: str, settings: Settings) -> None:
    """Refuse a URL the worker must not reach (TargetRefused) or cannot (MissingExtra).

    ``url`` has the shape ``kind`` needs (the schema checked it).
    """
    if kind not in BROKER_KINDS:
        validate_target_url(url, allow_private=settings.allow_private_targets)
        return
    extra = missing_extra(kind)
    if extra is not None:
        raise MissingExtra(
            f"kind {kind} needs its client library: pip install 'motionhook[{extra}]'"
        )
    if kind in HOSTED_KINDS:
        destination = parse_destination(kind, url)
        resolve_destination(
            destination.host,
            destination.port,
            allow_private=settings.allow_private_targets,
            allowed_hosts=settings.destination_allowed_hosts,
        )


def _shown_url(kind: str, url: str, *, full: bool) -> str:
    """A target URL as a response shows it: a broker's never with its password; a
    Slack or Discord URL (itself the credential) whole only in the create response."""
    if kind in BROKER_KINDS:
        return mask_destination_url(kind, url)
    return url if full else mask_target_url(kind, url)


class SubscriptionLimitReached(Exception):
    """The project already has as many subscriptions as it may."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"this project already has {limit} subscriptions, the most it may have "
            "(MOTIONHOOK_MAX_SUBSCRIPTIONS_PER_PROJECT); delete one first"
        )


class RotatingSecret(Protocol):
    """A row that signs with a secret and keeps the previous one for an overlap."""

    secret: str | None
    previous_secret: str | None
    previous_secret_expires_at: datetime | None
    updated_at: datetime


def _shorten(segment: str) -> str:
    """Keep the ends of an id-like path segment (``T0…EF``), enough to recognise it."""
    if len(segment) <= 6 or not any(char.isdigit() for char in segment):
        return segment
    return f"{segment[:2]}…{segment[-2:]}" if len(segment) >= 10 else f"{segment[:2]}…"


def mask_target_url(kind: str, url: str) -> str:
    """Show a destination URL without the credential in it: recognisable, not usable.

    Any password in the URL becomes ``***``. For kinds whose URL is itself the
    credential (Slack, Discord) the token (last path segment) becomes ``***``, ids
    keep only their ends and the query goes:
    ``https://hooks.slack.com/services/T0…/B0…/***``.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":" + MASK
    netloc = f"{userinfo}{at}{hostport}"
    path, query, fragment = parts.path, parts.query, parts.fragment
    if kind in SECRET_URL_KINDS:
        segments = path.split("/")
        last = max((i for i, segment in enumerate(segments) if segment), default=None)
        segments = [MASK if i == last else _shorten(segment) for i, segment in enumerate(segments)]
        path, query, fragment = "/".join(segments), "", ""
    return urlunsplit((parts.scheme, netloc, path, query, fragment))


def subscription_resource(
    sub: Subscription, *, secret: str | None = None, full_url: bool = False
) -> dict[str, Any]:
    """Render a subscription; its full URL and its secret only when just created (or rotated)."""
    resource: dict[str, Any] = {
        "id": sub.id,
        "kind": sub.kind,
        "url": _shown_url(sub.kind, sub.url, full=full_url),
        "events": list(sub.events or []),
        "description": sub.description,
        "enabled": sub.enabled,
        "disabled_reason": sub.disabled_reason,
        "created_at": isoformat(sub.created_at),
        "updated_at": isoformat(sub.updated_at),
    }
    if secret is not None:
        resource["secret"] = secret
    return resource


def create_subscription(
    session: Session, project_id: str, params: dict[str, Any], *, limit: int
) -> Subscription:
    """Add a subscription to the project, unless it already has ``limit`` of them."""
    # Lock the project row so that concurrent creates count one after the other.
    session.execute(
        select(Project.id).where(Project.id == project_id).with_for_update(key_share=True)
    )
    count = session.scalar(
        select(func.count()).select_from(Subscription).where(Subscription.project_id == project_id)
    )
    if (count or 0) >= limit:
        raise SubscriptionLimitReached(limit)
    now = utcnow()
    sub = Subscription(
        id=new_id("sub"),
        project_id=project_id,
        kind=params["kind"],
        url=params["url"],
        events=list(dict.fromkeys(params["events"])),
        description=params.get("description", ""),
        enabled=params.get("enabled", True),
        secret=generate_secret() if params["kind"] in SIGNED_KINDS else None,
        created_at=now,
        updated_at=now,
    )
    session.add(sub)
    return sub


def update_subscription(sub: Subscription, changes: dict[str, Any]) -> None:
    """Apply a PATCH; re-enabling clears the reason and the failure streak."""
    for name in ("url", "description"):
        if name in changes:
            setattr(sub, name, changes[name])
    if "events" in changes:
        sub.events = list(dict.fromkeys(changes["events"]))
    if "enabled" in changes:
        sub.enabled = changes["enabled"]
        if sub.enabled:
            sub.disabled_reason = None
            sub.failing_since = None
        elif not sub.disabled_reason:
            sub.disabled_reason = "disabled by request"
    sub.updated_at = utcnow()


def rotate_secret(sub: RotatingSecret) -> str:
    """Give the row a new secret; the old one keeps signing for 24 hours."""
    now = utcnow()
    new_secret = generate_secret()
    sub.previous_secret = sub.secret
    sub.previous_secret_expires_at = now + SECRET_OVERLAP
    sub.secret = new_secret
    sub.updated_at = now
    return new_secret


def send_test_event(session: Session, db: Database, sub: Subscription) -> tuple[Event, Delivery]:
    """Queue a ``test.ping`` event for this subscription alone."""
    event = new_event(
        session,
        "test.ping",
        {"subscription_id": sub.id, "message": "Test event from motionhook"},
        job_id=None,
        project_id=sub.project_id,
    )
    delivery = add_delivery(
        session, event, kind=sub.kind, subscription_id=sub.id, target_url=None, job_id=None
    )
    db.notify(session)
    return event, delivery


def recover_failed(session: Session, db: Database, sub: Subscription, since: datetime) -> int:
    """Queue again every failed delivery of the subscription created since ``since``."""
    now = utcnow()
    result = session.execute(
        update(Delivery)
        .where(
            Delivery.subscription_id == sub.id,
            Delivery.status == DeliveryStatus.FAILED,
            Delivery.created_at >= since,
        )
        .values(status=DeliveryStatus.PENDING, due_at=now, lease_owner=None, updated_at=now)
    )
    count = int(getattr(result, "rowcount", 0) or 0)
    if count:
        db.notify(session)
    return count


def retry_delivery(session: Session, db: Database, delivery: Delivery) -> None:
    """Replay one delivery now, whatever its status."""
    now = utcnow()
    delivery.status = DeliveryStatus.PENDING
    delivery.due_at = now
    delivery.lease_owner = None
    delivery.updated_at = now
    db.notify(session)


def delivery_resource(
    delivery: Delivery, event_type: str | None, attempts: list[DeliveryAttempt] | None = None
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "id": delivery.id,
        "event_id": delivery.event_id,
        "event_type": event_type,
        "subscription_id": delivery.subscription_id,
        "job_id": delivery.job_id,
        "kind": delivery.kind,
        "status": delivery.status,
        "attempt_count": delivery.attempt_count,
        "next_attempt_at": isoformat(delivery.due_at)
        if delivery.status == DeliveryStatus.PENDING
        else None,
        "last_status_code": delivery.last_status_code,
        "last_error": delivery.last_error,
        "created_at": isoformat(delivery.created_at),
        "updated_at": isoformat(delivery.updated_at),
        "delivered_at": isoformat(delivery.delivered_at),
    }
    if attempts is not None:
        resource["attempts"] = [
            {
                "attempted_at": isoformat(attempt.attempted_at),
                "status_code": attempt.status_code,
                "latency_ms": attempt.latency_ms,
                "error": attempt.error,
                "response_excerpt": attempt.response_excerpt,
                "outcome": attempt.outcome,
            }
            for attempt in attempts
        ]
    return resource


def get_delivery(session: Session, project_id: str, delivery_id: str) -> dict[str, Any] | None:
    """One of the project's deliveries with every attempt, or None."""
    # An outer join: a chat reply may have no event (the Discord "queued" edit).
    row = session.execute(
        select(Delivery, Event.type)
        .outerjoin(Event, Event.id == Delivery.event_id)
        .where(Delivery.id == delivery_id, Delivery.project_id == project_id)
    ).first()
    if row is None:
        return None
    delivery, event_type = row
    attempts = list(
        session.scalars(
            select(DeliveryAttempt)
            .where(DeliveryAttempt.delivery_id == delivery_id)
            .order_by(DeliveryAttempt.attempted_at, DeliveryAttempt.id)
        )
    )
    return delivery_resource(delivery, event_type, attempts)


def list_deliveries(
    session: Session, project_id: str, *, filters: dict[str, Any], limit: int, cursor: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of the project's deliveries, newest first."""
    query = (
        select(Delivery, Event.type)
        .outerjoin(Event, Event.id == Delivery.event_id)
        .where(Delivery.project_id == project_id)
        .order_by(Delivery.created_at.desc(), Delivery.id.desc())
        .limit(limit + 1)
    )
    for name in ("subscription_id", "job_id", "status"):
        if filters.get(name):
            query = query.where(getattr(Delivery, name) == filters[name])
    if cursor:
        created, delivery_id = decode_cursor(cursor)
        query = query.where(
            or_(
                Delivery.created_at < created,
                and_(Delivery.created_at == created, Delivery.id < delivery_id),
            )
        )
    rows = list(session.execute(query))
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1][0]
        next_cursor = encode_cursor_parts(last.created_at, last.id)
    return [delivery_resource(d, t) for d, t in rows[:limit]], next_cursor
