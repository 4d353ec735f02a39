"""Delivering one event to one target, by the policy of DESIGN §3.

A delivery thread renders the message for the channel, sends it once over the
worker's SSRF-guarded session, records the attempt, and then settles the
delivery: delivered, retried later (schedule with jitter, ``Retry-After``
honoured), failed, or failed permanently (which disables the subscription).
"""

from __future__ import annotations

import logging
import random
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import requests
from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from service.extension import Services
from service.metrics import record_delivery, record_subscription_disabled
from service.models import Delivery, DeliveryAttempt, Event, Subscription, utcnow
from service.notifiers import render_message
from service.notifiers.brokers import BROKER_KINDS, BrokerPool
from service.notifiers.policy import AttemptResult, next_attempt_delay, send
from service.notifiers.webhook import serialize
from service.queue import ClaimedDelivery, claim_deliveries

log = logging.getLogger("motionhook.delivery")

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
SLACK_PACE = 1.0


def active_secrets(sub: Subscription | _Target, now: datetime) -> list[str]:
    """The subscription's secret, plus the previous one while its 24 h overlap lasts."""
    secrets = [sub.secret] if sub.secret else []
    expires = sub.previous_secret_expires_at
    if sub.previous_secret and expires is not None and expires > now:
        secrets.append(sub.previous_secret)
    return secrets


def disable_subscription(sub: Subscription, reason: str, now: datetime) -> None:
    record_subscription_disabled(sub.kind)
    sub.enabled = False
    sub.disabled_reason = reason[:500]
    sub.updated_at = now


@dataclass(frozen=True)
class Prepared:
    """What a delivery thread needs to send one delivery, read when it was claimed."""

    kind: str
    url: str
    envelope: dict[str, Any]
    secrets: list[str]
    # The webhook body, serialized once per event for all its subscriptions.
    serialized: str | None = None


@dataclass
class _Settlement:
    """One attempt waiting to be written (by the next batch, see ``Deliverer._settle``)."""

    delivery_id: str
    result: AttemptResult
    error: BaseException | None = None
    # (subscription id, job id) once settled; None when the delivery was deleted meanwhile.
    found: tuple[str | None, str | None] | None = None


def _lock_subscriptions(session: Session, ids: Iterable[str]) -> dict[str, Subscription]:
    """Load and lock subscriptions in id order (no deadlocks between workers).

    ``FOR NO KEY UPDATE`` on PostgreSQL: it still serializes pacing and failure
    bookkeeping, but does not block ``web`` inserting deliveries that reference the
    row (a foreign key check takes ``KEY SHARE``).
    """
    wanted = sorted(ids)
    if not wanted:
        return {}
    query = (
        select(Subscription)
        .where(Subscription.id.in_(wanted))
        .order_by(Subscription.id)
        .with_for_update(key_share=True)
    )
    return {sub.id: sub for sub in session.scalars(query)}


@dataclass(frozen=True)
class _Target:
    """The columns of a subscription that preparing a delivery reads."""

    id: str
    kind: str
    url: str
    enabled: bool
    disabled_reason: str | None
    next_send_at: datetime | None
    secret: str | None
    previous_secret: str | None
    previous_secret_expires_at: datetime | None


# Statements of the hot path, built once (Core: no ORM objects for thousands a second).
DELIVERIES = cast(Table, Delivery.__table__)
EVENTS = cast(Table, Event.__table__)
SUBSCRIPTIONS = cast(Table, Subscription.__table__)
ATTEMPTS = cast(Table, DeliveryAttempt.__table__)
EVENT_PAYLOADS = select(EVENTS.c.id, EVENTS.c.payload).where(
    EVENTS.c.id.in_(bindparam("ids", expanding=True))
)
LOCK_TARGETS = (
    select(*(SUBSCRIPTIONS.c[name] for name in _Target.__dataclass_fields__))
    .where(SUBSCRIPTIONS.c.id.in_(bindparam("ids", expanding=True)))
    .order_by(SUBSCRIPTIONS.c.id)
    .with_for_update(key_share=True)
)
PACE = (
    update(SUBSCRIPTIONS)
    .where(SUBSCRIPTIONS.c.id == bindparam("sub_id"))
    .values(next_send_at=bindparam("pace_until"))
)
SETTLE_DELIVERED = (
    update(DELIVERIES)
    .where(DELIVERIES.c.id.in_(bindparam("ids", expanding=True)))
    .values(
        status=DELIVERED,
        delivered_at=bindparam("settled_at"),
        due_at=None,
        lease_owner=None,
        last_error=None,
        attempt_count=DELIVERIES.c.attempt_count + 1,
        last_status_code=bindparam("code"),
        updated_at=bindparam("settled_at"),
    )
    .returning(DELIVERIES.c.id, DELIVERIES.c.subscription_id, DELIVERIES.c.job_id)
)
INSERT_ATTEMPTS = insert(ATTEMPTS)
CLEAR_FAILING = (
    update(SUBSCRIPTIONS)
    .where(
        SUBSCRIPTIONS.c.id.in_(bindparam("ids", expanding=True)),
        SUBSCRIPTIONS.c.failing_since.is_not(None),
    )
    .values(failing_since=None)
)


def _failed(reason: str, now: datetime) -> dict[str, Any]:
    """The columns of a delivery that failed for good."""
    return {
        "status": FAILED,
        "last_error": reason[:1000],
        "lease_owner": None,
        "due_at": None,
        "updated_at": now,
    }


def _set_aside(session: Session, delivery_id: str, **values: Any) -> None:
    session.connection().execute(
        update(DELIVERIES).where(DELIVERIES.c.id == delivery_id).values(**values)
    )


def _plain_success(result: AttemptResult) -> bool:
    return result.outcome.result == DELIVERED and result.pacing <= 0


def _attempt_log(
    item: _Settlement, subscription_id: str | None, job_id: str | None
) -> dict[str, Any]:
    result = item.result
    return {
        "delivery_id": item.delivery_id,
        "outcome": result.outcome.result,
        "http_status": result.status,
        "latency_ms": round(result.latency_ms, 1),
        "subscription_id": subscription_id,
        "job_id": job_id,
    }


class Deliverer:
    """Claims, sends and settles deliveries; one instance per worker, shared by its threads.

    The database work is batched, because it, not the HTTP, is what limits fan-out:
    one transaction claims a batch and reads everything needed to send it (events,
    subscriptions, pacing), and attempts are settled by group commit: a thread that
    finishes while another is writing queues its result, and the next writer takes
    every queued result in one transaction. ``deliver`` still returns only once its
    own attempt is committed, so a delivery is either settled or still leased.
    """

    def __init__(self, services: Services, session: requests.Session, owner: str) -> None:
        self.services = services
        self.settings = services.settings
        self.db = services.db
        self.http = session
        self.brokers = BrokerPool(self.settings)
        self.owner = owner
        self.rng = random.Random()
        self._claimed: dict[str, Prepared] = {}
        self._claimed_lock = threading.Lock()
        self._settling = threading.Lock()
        self._queue_committed = threading.Event()
        self._queue: list[_Settlement] = []
        self._writing = False

    def claim(self, limit: int) -> list[str]:
        """Lease up to ``limit`` due deliveries and prepare them; return the sendable ids.

        Deliveries whose subscription is gone or disabled fail here, and paced ones
        (Slack 1/s, Discord's rate limit) are put back until their slot, as one send
        would; neither is returned.
        """
        now = utcnow()
        ready: dict[str, Prepared] = {}
        with self.db.transaction(durable=False) as session:
            claimed = claim_deliveries(
                session,
                self.db,
                owner=self.owner,
                lease=self.settings.delivery_lease,
                limit=limit,
                now=now,
            )
            if not claimed:
                return []
            for delivery_id, prepared in self._prepare_batch(session, claimed, now).items():
                if prepared is not None:
                    ready[delivery_id] = prepared
        with self._claimed_lock:
            self._claimed.update(ready)
        return list(ready)

    def deliver(self, delivery_id: str) -> None:
        """Make one attempt at a claimed delivery and settle it."""
        with self._claimed_lock:
            prepared = self._claimed.pop(delivery_id, None)
        if prepared is None:
            prepared = self._prepare(delivery_id)
        if prepared is None:
            return
        if prepared.kind in BROKER_KINDS:
            result = self.brokers.send(
                prepared.kind,
                prepared.url,
                prepared.envelope,
                secrets=prepared.secrets,
                serialized=prepared.serialized,
            )
        else:
            message = render_message(
                prepared.kind,
                prepared.envelope,
                secrets=prepared.secrets,
                serialized=prepared.serialized,
            )
            result = send(
                self.http,
                prepared.url,
                message,
                kind=prepared.kind,
                timeout=self.settings.delivery_timeout,
                now=lambda: datetime.now(UTC),
            )
        record_delivery(prepared.kind, result.outcome.result, result.latency_ms / 1000)
        self._settle(delivery_id, result)

    def close(self) -> None:
        """Close the broker connections (the worker is stopping)."""
        self.brokers.close()

    def _prepare(self, delivery_id: str) -> Prepared | None:
        """Prepare one delivery leased to us outside :meth:`claim`."""
        now = utcnow()
        with self.db.transaction() as session:
            row = session.execute(
                select(
                    Delivery.id,
                    Delivery.event_id,
                    Delivery.subscription_id,
                    Delivery.kind,
                    Delivery.target_url,
                ).where(
                    Delivery.id == delivery_id,
                    Delivery.status == PENDING,
                    Delivery.lease_owner == self.owner,
                )
            ).first()
            if row is None:
                return None
            return self._prepare_batch(session, [ClaimedDelivery(*row)], now)[delivery_id]

    def _prepare_batch(
        self, session: Session, claimed: list[ClaimedDelivery], now: datetime
    ) -> dict[str, Prepared | None]:
        """Decide for each claimed delivery: send it (Prepared), fail it, or wait for pacing."""
        connection = session.connection()
        payloads: dict[str, dict[str, Any]] = {
            row[0]: row[1]
            for row in connection.execute(
                EVENT_PAYLOADS, {"ids": sorted({item.event_id for item in claimed})}
            )
        }
        wanted = sorted({item.subscription_id for item in claimed if item.subscription_id})
        targets = (
            {row.id: _Target(*row) for row in connection.execute(LOCK_TARGETS, {"ids": wanted})}
            if wanted
            else {}
        )
        bodies: dict[str, str] = {}

        def body(event_id: str, kind: str) -> str | None:
            if kind != "webhook" and kind not in BROKER_KINDS:
                return None
            if event_id not in bodies:
                bodies[event_id] = serialize(payloads[event_id])
            return bodies[event_id]

        decided: dict[str, Prepared | None] = {}
        for item in claimed:
            payload = payloads[item.event_id]
            if item.subscription_id is None:
                decided[item.id] = Prepared(
                    item.kind,
                    item.target_url or "",
                    payload,
                    [self.settings.webhook_secret],
                    body(item.event_id, item.kind),
                )
                continue
            sub = targets.get(item.subscription_id)
            decided[item.id] = None
            if sub is None or not sub.enabled:
                reason = (
                    "subscription deleted"
                    if sub is None
                    else (f"subscription disabled: {sub.disabled_reason or 'by request'}")
                )
                _set_aside(session, item.id, **_failed(reason, now))
            elif sub.next_send_at is not None and sub.next_send_at > now:
                # Paced (Slack 1/s, Discord's rate limit): wait for the slot, no attempt.
                _set_aside(session, item.id, due_at=sub.next_send_at, lease_owner=None)
            else:
                if sub.kind == "slack":
                    paced = now + timedelta(seconds=SLACK_PACE)
                    connection.execute(PACE, {"sub_id": sub.id, "pace_until": paced})
                    targets[sub.id] = replace(sub, next_send_at=paced)
                decided[item.id] = Prepared(
                    sub.kind,
                    sub.url,
                    payload,
                    active_secrets(sub, now),
                    body(item.event_id, sub.kind),
                )
        return decided

    def _fail(self, delivery: Delivery, reason: str, now: datetime) -> None:
        for name, value in _failed(reason, now).items():
            setattr(delivery, name, value)

    def _settle(self, delivery_id: str, result: AttemptResult) -> None:
        """Record the attempt and its outcome; return once that is committed (group commit).

        The first thread to find no writer becomes it and writes batches until the
        queue is empty; the others wait only for their own attempt to be committed.
        """
        mine = _Settlement(delivery_id, result)
        with self._settling:
            self._queue.append(mine)
            committed = self._queue_committed  # set once the batch holding ``mine`` is
            lead = not self._writing
            self._writing = True
        while lead:
            with self._settling:
                if not self._queue:
                    self._writing = False
                    break
                batch, self._queue = self._queue, []
                done, self._queue_committed = self._queue_committed, threading.Event()
            failure: BaseException | None = None
            try:
                self._write(batch)
            except BaseException as exc:
                failure = exc
            for item in batch:
                item.error = item.error or failure
            done.set()
        committed.wait()
        if mine.error is not None:
            raise mine.error
        if mine.found is not None:
            # Successes at DEBUG: every attempt is in the database (GET /v1/deliveries/{id})
            # and a line per success costs the worker a fifth of its CPU at full speed.
            level = logging.DEBUG if _plain_success(mine.result) else logging.INFO
            if log.isEnabledFor(level):
                log.log(level, "delivery attempt", extra=_attempt_log(mine, *mine.found))

    def _write(self, batch: list[_Settlement]) -> None:
        """Settle a batch in one transaction, or each on its own if the batch fails."""
        try:
            self._settle_batch(batch)
        except SQLAlchemyError:
            if len(batch) == 1:
                batch[0].error = sys.exc_info()[1]
                return
            log.warning("settling %d deliveries together failed; one by one", len(batch))
            for item in batch:
                try:
                    self._settle_batch([item])
                except SQLAlchemyError as exc:
                    item.error = exc

    def _settle_batch(self, batch: list[_Settlement]) -> None:
        now = utcnow()
        plain = [item for item in batch if _plain_success(item.result)]
        others = [item for item in batch if not _plain_success(item.result)]
        # Not durable: losing this in a database crash only means sending again.
        with self.db.transaction(durable=False) as session:
            if plain:
                self._settle_delivered(session, plain, now)
            if others:
                self._settle_others(session, others, now)

    def _settle_delivered(self, session: Session, batch: list[_Settlement], now: datetime) -> None:
        """Settle plain successes (the common case) in three statements, however many."""
        connection = session.connection()
        found: dict[str, tuple[str | None, str | None]] = {}
        by_status: dict[int | None, list[str]] = {}
        for item in batch:
            by_status.setdefault(item.result.status, []).append(item.delivery_id)
        for status, ids in by_status.items():
            rows = connection.execute(
                SETTLE_DELIVERED, {"ids": sorted(ids), "settled_at": now, "code": status}
            )
            found.update({row[0]: (row[1], row[2]) for row in rows})
        settled = [item for item in batch if item.delivery_id in found]
        if not settled:
            return
        connection.execute(
            INSERT_ATTEMPTS,
            [
                {
                    "delivery_id": item.delivery_id,
                    "attempted_at": now,
                    "status_code": item.result.status,
                    "latency_ms": round(item.result.latency_ms, 2),
                    "error": item.result.error,
                    "response_excerpt": item.result.response_excerpt,
                    "outcome": DELIVERED,
                }
                for item in settled
            ],
        )
        succeeded = sorted({sub for sub, _job in found.values() if sub})
        if succeeded:
            connection.execute(CLEAR_FAILING, {"ids": succeeded})
        for item in settled:
            item.found = found[item.delivery_id]

    def _settle_others(self, session: Session, batch: list[_Settlement], now: datetime) -> None:
        """Settle retries, failures and paced successes: they need the rows themselves."""
        deliveries = {
            delivery.id: delivery
            for delivery in session.scalars(
                select(Delivery)
                .where(Delivery.id.in_(sorted({item.delivery_id for item in batch})))
                .order_by(Delivery.id)
                .with_for_update()
            )
        }
        subs = _lock_subscriptions(
            session, {d.subscription_id for d in deliveries.values() if d.subscription_id}
        )
        for item in batch:
            delivery = deliveries.get(item.delivery_id)
            if delivery is None:
                continue
            result = item.result
            session.add(
                DeliveryAttempt(
                    delivery_id=delivery.id,
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
            sub = subs.get(delivery.subscription_id) if delivery.subscription_id else None
            self._apply_outcome(session, delivery, sub, result, now)
            item.found = (delivery.subscription_id, delivery.job_id)

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
