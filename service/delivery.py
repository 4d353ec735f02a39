"""Delivering one event to one target, by the delivery policy.

A delivery thread renders the message for the channel, sends it once over the
worker's SSRF-guarded session, records the attempt, and then settles the
delivery: delivered, retried later (schedule with jitter, ``Retry-After``
honoured), failed, or failed permanently (which disables the subscription).

Deliveries to one broker destination are claimed and sent as a batch (one
pipelined publish, see :mod:`service.notifiers.brokers`); every other delivery is
sent on its own.

What an attempt does to the rows is decided in two pure functions, one for the
delivery (:func:`settled_columns`) and one for its subscription
(:func:`subscription_changes`); :class:`Deliverer` only batches the writes.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import requests
from sqlalchemy import Connection, Table, Update, bindparam, insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from service.chat.replies import CHAT_REPLY_KINDS, queued_envelope, send_reply
from service.extension import Services
from service.metrics import record_delivery, record_subscription_disabled
from service.models import (
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    Event,
    Project,
    Subscription,
    utcnow,
)
from service.notifiers import render_message
from service.notifiers.brokers import BROKER_KINDS, BrokerPool, outgoing
from service.notifiers.policy import AttemptResult, send
from service.notifiers.webhook import serialize
from service.queue import ClaimedDelivery, claim_deliveries
from service.retry import Schedule

log = logging.getLogger("motionhook.delivery")

# Slack accepts about one message a second per incoming webhook: a claim reserves it.
SLACK_PACE = 1.0
# Settling stops retrying through a database outage this long before the lease ends.
LEASE_MARGIN = 2.0
# At most this many deliveries to one broker destination are published together.
PUBLISH_BATCH = 32


def active_secrets(sub: Subscription | _Target | Project, now: datetime) -> list[str]:
    """The row's secret, plus the previous one while its 24 h overlap lasts."""
    secrets = [sub.secret] if sub.secret else []
    expires = sub.previous_secret_expires_at
    if sub.previous_secret and expires is not None and expires > now:
        secrets.append(sub.previous_secret)
    return secrets


@dataclass(frozen=True)
class Prepared:
    """A claimed delivery with everything a delivery thread needs to send it."""

    delivery_id: str
    kind: str
    url: str
    envelope: dict[str, Any]
    secrets: list[str]
    # time.monotonic() at which our lease on the delivery runs out.
    leased_until: float
    # The webhook body, serialized once per event for all its subscriptions.
    serialized: str | None = None


# What a delivery thread sends in one go: one delivery, or several to one broker destination.
Batch = tuple[Prepared, ...]


def batches(ready: list[Prepared], size: int = PUBLISH_BATCH) -> list[Batch]:
    """Group deliveries to the same broker destination, ``size`` at most; others stay alone."""
    alone: list[Batch] = []
    groups: dict[tuple[str, str], list[Prepared]] = {}
    for prepared in ready:
        if prepared.kind not in BROKER_KINDS:
            alone.append((prepared,))
            continue
        groups.setdefault((prepared.kind, prepared.url), []).append(prepared)
    grouped = [
        tuple(group[start : start + size])
        for group in groups.values()
        for start in range(0, len(group), size)
    ]
    return alone + grouped


@dataclass
class _Settlement:
    """One attempt waiting to be written (by the next batch, see ``Deliverer._settle``)."""

    prepared: Prepared
    result: AttemptResult
    error: BaseException | None = None
    # (subscription id, job id) once settled; None when the delivery was deleted meanwhile.
    found: tuple[str | None, str | None] | None = None


@dataclass(frozen=True)
class _Target:
    """The columns of a subscription that preparing and settling deliveries read."""

    id: str
    kind: str
    url: str
    enabled: bool
    disabled_reason: str | None
    next_send_at: datetime | None
    failing_since: datetime | None
    secret: str | None
    previous_secret: str | None
    previous_secret_expires_at: datetime | None


# Statements of the hot path, built once (Core: no ORM objects for thousands a second).
DELIVERIES = cast(Table, Delivery.__table__)
EVENTS = cast(Table, Event.__table__)
SUBSCRIPTIONS = cast(Table, Subscription.__table__)
ATTEMPTS = cast(Table, DeliveryAttempt.__table__)
EVENT_PAYLOADS = select(EVENTS.c.id, EVENTS.c.payload, EVENTS.c.project_id).where(
    EVENTS.c.id.in_(bindparam("ids", expanding=True))
)
# The one way subscriptions are locked, in id order (no deadlocks between workers).
# FOR NO KEY UPDATE on PostgreSQL: it serializes pacing and failure bookkeeping but does
# not block web inserting deliveries that reference the row (a foreign key check takes
# KEY SHARE).
LOCK_TARGETS = (
    select(*(SUBSCRIPTIONS.c[name] for name in _Target.__dataclass_fields__))
    .where(SUBSCRIPTIONS.c.id.in_(bindparam("ids", expanding=True)))
    .order_by(SUBSCRIPTIONS.c.id)
    .with_for_update(key_share=True)
)
# What counting an attempt returns: the new count, and what settling reads of the row.
COUNTED = (
    DELIVERIES.c.id,
    DELIVERIES.c.attempt_count,
    DELIVERIES.c.subscription_id,
    DELIVERIES.c.job_id,
)
COUNT_ATTEMPT = (
    update(DELIVERIES)
    .where(DELIVERIES.c.id.in_(bindparam("ids", expanding=True)))
    .values(attempt_count=DELIVERIES.c.attempt_count + 1)
    .returning(*COUNTED)
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
        "status": DeliveryStatus.FAILED,
        "last_error": reason[:1000],
        "lease_owner": None,
        "due_at": None,
        "updated_at": now,
    }


def delivered_columns(result: AttemptResult, now: datetime) -> dict[str, Any]:
    """The columns of a delivery that succeeded (whichever attempt it was)."""
    return {
        "last_status_code": result.status,
        "status": DeliveryStatus.DELIVERED,
        "delivered_at": now,
        "due_at": None,
        "lease_owner": None,
        "last_error": None,
        "updated_at": now,
    }


def settled_columns(
    result: AttemptResult,
    *,
    attempts: int,
    now: datetime,
    schedule: Schedule,
    rng: random.Random,
) -> dict[str, Any]:
    """The delivery's columns after its ``attempts``-th attempt ended as ``result``."""
    outcome = result.outcome
    columns: dict[str, Any] = {"last_status_code": result.status}
    if outcome.result == "delivered":
        return delivered_columns(result, now)
    if outcome.result == "retry":
        delay = schedule.delay(attempts, retry_after=outcome.retry_after, rng=rng)
        if delay is not None:
            return columns | {
                "due_at": now + timedelta(seconds=delay),
                "lease_owner": None,
                "last_error": outcome.reason[:1000],
                "updated_at": now,
            }
        return columns | _failed(f"gave up after {attempts} attempts: {outcome.reason}", now)
    return columns | _failed(outcome.reason, now)


def subscription_changes(
    sub: _Target, result: AttemptResult, *, now: datetime, disable_after: float
) -> dict[str, Any]:
    """The subscription's columns that change after one of its deliveries ended as ``result``.

    Pacing the receiver asked for (Discord's rate-limit headers), the failure
    clock (``failing_since``), and disabling: at once on a permanent failure, or
    after ``disable_after`` seconds of failures without a success.
    """
    changes: dict[str, Any] = {}
    if result.pacing > 0:
        paced = now + timedelta(seconds=result.pacing)
        if sub.next_send_at is None or sub.next_send_at < paced:
            changes["next_send_at"] = paced
    outcome = result.outcome
    if outcome.result == "delivered":
        if sub.failing_since is not None:
            changes["failing_since"] = None
        return changes
    if outcome.result == "permanent":
        reason = outcome.reason
    elif sub.failing_since is None:
        return changes | {"failing_since": now}
    elif (now - sub.failing_since).total_seconds() >= disable_after:
        reason = f"failing without a success since {sub.failing_since.isoformat()}"
    else:
        return changes
    return changes | {"enabled": False, "disabled_reason": reason[:500], "updated_at": now}


@functools.lru_cache(maxsize=16)
def _settle_statement(names: tuple[str, ...], *, counting: bool) -> Update:
    """``UPDATE deliveries SET <names> WHERE id IN :ids``, built once per shape of outcome.

    ``counting``: also count the attempt, and return the :data:`COUNTED` columns.
    """
    values: dict[str, Any] = {
        name: bindparam(f"new_{name}", type_=DELIVERIES.c[name].type) for name in names
    }
    statement = update(DELIVERIES).where(DELIVERIES.c.id.in_(bindparam("ids", expanding=True)))
    if not counting:
        return statement.values(values)
    return statement.values(values | {"attempt_count": DELIVERIES.c.attempt_count + 1}).returning(
        *COUNTED
    )


Shape = tuple[tuple[str, Any], ...]


def _shape(columns: dict[str, Any]) -> Shape:
    return tuple(sorted(columns.items()))


def _set(connection: Connection, shape: Shape, ids: list[str], *, counting: bool) -> Any:
    """Write ``shape`` to the deliveries ``ids`` in one statement."""
    statement = _settle_statement(tuple(name for name, _value in shape), counting=counting)
    return connection.execute(
        statement, {"ids": ids, **{f"new_{name}": value for name, value in shape}}
    )


def _plain_success(result: AttemptResult) -> bool:
    """A success that changes nothing on its subscription but, maybe, ``failing_since``."""
    return result.outcome.result == "delivered" and result.pacing <= 0


def _attempt_log(item: _Settlement) -> dict[str, Any]:
    result = item.result
    subscription_id, job_id = item.found or (None, None)
    return {
        "delivery_id": item.prepared.delivery_id,
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
    own attempt is committed, so a delivery is either settled or still leased; a
    database outage meanwhile is waited out while the lease lasts, so a message
    that was sent is not sent again.
    """

    def __init__(self, services: Services, session: requests.Session, owner: str) -> None:
        self.services = services
        self.settings = services.settings
        self.db = services.db
        self.http = session
        self.brokers = BrokerPool(self.settings)
        self.owner = owner
        self.rng = random.Random()
        self.schedule = Schedule(self.settings.retry_schedule)
        self._settling = threading.Lock()
        self._queue_committed = threading.Event()
        self._queue: list[_Settlement] = []
        self._writing = False

    def claim(self, limit: int) -> list[Batch]:
        """Lease up to ``limit`` due deliveries and prepare the sendable ones, in batches.

        Deliveries whose subscription is gone or disabled fail here, and paced ones
        (Slack 1/s, Discord's rate limit) are put back until their slot, as one send
        would; neither is returned.
        """
        now = utcnow()
        leased_until = time.monotonic() + self.settings.delivery_lease
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
            return batches(self._prepare_batch(session, claimed, now, leased_until))

    def deliver(self, batch: Batch) -> None:
        """Make one attempt at each delivery of a claimed batch and settle them."""
        first = batch[0]
        if first.kind in BROKER_KINDS:
            messages = [outgoing(p.envelope, p.secrets, p.serialized) for p in batch]
            results = self.brokers.publish(first.kind, first.url, messages)
        else:
            results = [self._send(prepared) for prepared in batch]
        for prepared, result in zip(batch, results, strict=True):
            record_delivery(prepared.kind, result.outcome.result, result.latency_ms / 1000)
        self._settle(list(zip(batch, results, strict=True)))

    def _send(self, prepared: Prepared) -> AttemptResult:
        """One attempt at a delivery over HTTP (a webhook, Slack, Discord, a chat reply)."""
        if prepared.kind in CHAT_REPLY_KINDS:
            return send_reply(self.services, self.http, prepared.envelope, now=datetime.now(UTC))
        message = render_message(
            prepared.kind,
            prepared.envelope,
            secrets=prepared.secrets,
            serialized=prepared.serialized,
        )
        return send(
            self.http,
            prepared.url,
            message,
            kind=prepared.kind,
            timeout=self.settings.delivery_timeout,
            now=lambda: datetime.now(UTC),
        )

    def close(self) -> None:
        """Close the broker connections (the worker is stopping)."""
        self.brokers.close()

    def _prepare_batch(
        self,
        session: Session,
        claimed: list[ClaimedDelivery],
        now: datetime,
        leased_until: float,
    ) -> list[Prepared]:
        """Decide for each claimed delivery: send it (Prepared), fail it, or wait for pacing."""
        connection = session.connection()
        payloads: dict[str, dict[str, Any]] = {}
        event_projects: dict[str, str] = {}
        event_ids = sorted({item.event_id for item in claimed if item.event_id is not None})
        for event_id, payload, project_id in (
            connection.execute(EVENT_PAYLOADS, {"ids": event_ids}) if event_ids else ()
        ):
            payloads[event_id] = payload
            event_projects[event_id] = project_id
        # Per-job webhooks are signed with their project's secret (``default``: the setting).
        projects = sorted(
            {
                event_projects[i.event_id]
                for i in claimed
                if not i.subscription_id and i.event_id is not None
            }
        )
        signers = {
            project.id: active_secrets(project, now) or [self.settings.webhook_secret]
            for project in (
                session.scalars(select(Project).where(Project.id.in_(projects))) if projects else ()
            )
        }
        targets = self._lock_targets(
            session, {item.subscription_id for item in claimed if item.subscription_id}
        )
        bodies: dict[str, str] = {}

        def prepared(
            item: ClaimedDelivery, event_id: str, kind: str, url: str, secrets: list[str]
        ) -> Prepared:
            body = None
            if kind == "webhook" or kind in BROKER_KINDS:
                if event_id not in bodies:
                    bodies[event_id] = serialize(payloads[event_id])
                body = bodies[event_id]
            envelope = payloads[event_id]
            return Prepared(item.id, kind, url, envelope, secrets, leased_until, body)

        ready: list[Prepared] = []
        for item in claimed:
            if item.event_id is None:
                # A chat reply that is no event (the Discord "queued" edit): its envelope
                # names the job; nothing is signed and no subscription is involved.
                if item.kind in CHAT_REPLY_KINDS:
                    envelope = queued_envelope(item.job_id)
                    ready.append(Prepared(item.id, item.kind, "", envelope, [], leased_until))
                else:
                    self._update(session, DELIVERIES, item.id, _failed("no event to send", now))
                continue
            if item.subscription_id is None:
                signer = signers.get(event_projects[item.event_id])
                if signer is None:
                    self._update(session, DELIVERIES, item.id, _failed("project not found", now))
                else:
                    ready.append(
                        prepared(item, item.event_id, item.kind, item.target_url or "", signer)
                    )
                continue
            sub = targets.get(item.subscription_id)
            if sub is None or not sub.enabled:
                reason = (
                    "subscription deleted"
                    if sub is None
                    else f"subscription disabled: {sub.disabled_reason or 'by request'}"
                )
                self._update(session, DELIVERIES, item.id, _failed(reason, now))
            elif sub.next_send_at is not None and sub.next_send_at > now:
                # Paced (Slack 1/s, Discord's rate limit): wait for the slot, no attempt.
                values = {"due_at": sub.next_send_at, "lease_owner": None}
                self._update(session, DELIVERIES, item.id, values)
            else:
                if sub.kind == "slack":
                    paced = now + timedelta(seconds=SLACK_PACE)
                    self._update(session, SUBSCRIPTIONS, sub.id, {"next_send_at": paced})
                    targets[sub.id] = replace(sub, next_send_at=paced)
                ready.append(
                    prepared(item, item.event_id, sub.kind, sub.url, active_secrets(sub, now))
                )
        return ready

    @staticmethod
    def _lock_targets(session: Session, ids: set[str]) -> dict[str, _Target]:
        if not ids:
            return {}
        rows = session.connection().execute(LOCK_TARGETS, {"ids": sorted(ids)})
        return {row.id: _Target(*row) for row in rows}

    @staticmethod
    def _update(session: Session, table: Table, row_id: str, values: dict[str, Any]) -> None:
        session.connection().execute(update(table).where(table.c.id == row_id).values(**values))

    def _settle(self, attempts: list[tuple[Prepared, AttemptResult]]) -> None:
        """Record the attempts and their outcomes; return once that is committed (group commit).

        The first thread to find no writer becomes it and writes batches until the
        queue is empty; the others wait only for their own attempts to be committed.
        """
        mine = [_Settlement(prepared, result) for prepared, result in attempts]
        with self._settling:
            self._queue.extend(mine)
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
        for item in mine:
            if item.error is not None:
                raise item.error
        for item in mine:
            if item.found is not None:
                # Successes at DEBUG: every attempt is in the database (GET /v1/deliveries/{id})
                # and a line per success costs the worker a fifth of its CPU at full speed.
                level = logging.DEBUG if _plain_success(item.result) else logging.INFO
                if log.isEnabledFor(level):
                    log.log(level, "delivery attempt", extra=_attempt_log(item))

    def _write(self, batch: list[_Settlement]) -> None:
        """Settle a batch in one transaction, or each on its own if the batch fails.

        A database outage is waited out until the earliest lease of the batch is
        about to run out (then the deliveries come back through their leases).
        """
        deadline = min(item.prepared.leased_until for item in batch) - LEASE_MARGIN
        try:
            self.db.write_until(
                deadline, lambda session: self._settle_batch(session, batch), durable=False
            )
        except SQLAlchemyError as exc:
            if len(batch) == 1 or self.db.outage.ongoing:
                for item in batch:
                    item.error = exc
                return
            log.warning("settling %d deliveries together failed; one by one", len(batch))
            for item in batch:
                try:
                    with self.db.transaction(durable=False) as session:
                        self._settle_batch(session, [item])
                except SQLAlchemyError as single:
                    item.error = single

    def _settle_batch(self, session: Session, batch: list[_Settlement]) -> None:
        """Count, record and apply every attempt of ``batch`` (in the caller's transaction)."""
        now = utcnow()
        connection = session.connection()
        # Deliveries that end with the same columns are written by one statement: a batch
        # of plain successes is one UPDATE, whatever its size, which counts the attempts
        # too (a success's columns do not depend on the count; a retry's backoff does).
        succeeded: dict[Shape, list[str]] = {}
        others: list[str] = []
        for item in batch:
            if item.result.outcome.result == "delivered":
                shape = _shape(delivered_columns(item.result, now))
                succeeded.setdefault(shape, []).append(item.prepared.delivery_id)
            else:
                others.append(item.prepared.delivery_id)
        rows = {
            row.id: row
            for shape, ids in succeeded.items()
            for row in _set(connection, shape, sorted(ids), counting=True)
        }
        if others:
            counted = {
                row.id: row for row in connection.execute(COUNT_ATTEMPT, {"ids": sorted(others)})
            }
            groups: dict[Shape, list[str]] = {}
            for item in batch:
                row = counted.get(item.prepared.delivery_id)
                if row is not None:
                    columns = settled_columns(
                        item.result,
                        attempts=row.attempt_count,
                        now=now,
                        schedule=self.schedule,
                        rng=self.rng,
                    )
                    groups.setdefault(_shape(columns), []).append(row.id)
            for shape, ids in groups.items():
                _set(connection, shape, ids, counting=False)
            rows.update(counted)
        # A delivery deleted meanwhile (its subscription was) has nothing left to settle.
        settled = [item for item in batch if item.prepared.delivery_id in rows]
        for item in settled:
            row = rows[item.prepared.delivery_id]
            item.found = (row.subscription_id, row.job_id)
        if settled:
            connection.execute(
                INSERT_ATTEMPTS,
                [
                    {
                        "delivery_id": item.prepared.delivery_id,
                        "attempted_at": now,
                        "status_code": item.result.status,
                        "latency_ms": round(item.result.latency_ms, 2),
                        "error": item.result.error,
                        "response_excerpt": item.result.response_excerpt,
                        "outcome": item.result.outcome.result,
                    }
                    for item in settled
                ],
            )
        self._settle_subscriptions(session, settled, now)

    def _settle_subscriptions(
        self, session: Session, settled: list[_Settlement], now: datetime
    ) -> None:
        """Apply :func:`subscription_changes` of every attempt to its subscription."""
        by_sub: dict[str, list[AttemptResult]] = {}
        for item in settled:
            subscription_id = item.found[0] if item.found else None
            if subscription_id:
                by_sub.setdefault(subscription_id, []).append(item.result)
        # Subscriptions that saw only plain successes just stop failing: one statement.
        plain = sorted(sub for sub, results in by_sub.items() if all(map(_plain_success, results)))
        if plain:
            session.connection().execute(CLEAR_FAILING, {"ids": plain})
        targets = self._lock_targets(session, set(by_sub) - set(plain))
        for sub_id, target in targets.items():
            changes: dict[str, Any] = {}
            for result in by_sub[sub_id]:
                step = subscription_changes(
                    target, result, now=now, disable_after=self.settings.disable_after
                )
                if step.get("enabled") is False and target.enabled:
                    record_subscription_disabled(target.kind)
                target = replace(target, **{k: v for k, v in step.items() if k != "updated_at"})
                changes.update(step)
            if changes:
                self._update(session, SUBSCRIPTIONS, sub_id, changes)
