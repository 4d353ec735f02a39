"""Event-driven destinations: RabbitMQ, NATS JetStream, Redis Streams, SQS, EventBridge.

A delivery to a broker is one publish of the event envelope, byte for byte the body
a webhook gets, with the Standard Webhooks ``webhook-id``, ``webhook-timestamp`` and
``webhook-signature`` (the subscription's secrets) and ``event-type`` as headers or
attributes. The broker's acknowledgement (publisher confirm, PubAck, entry id,
``MessageId``, ``EventId``) is the success; its answer is the attempt's excerpt.

:class:`BrokerPool` keeps one :class:`Publisher` per destination URL for the
worker's lifetime, so one connection (or client) per destination is opened and
reused; a publisher whose kept connection turns out dead reconnects and publishes
once more within the same attempt. The worker hands a publisher its deliveries to
one destination as a batch, and the kinds that can pipeline send the batch at once
(a Redis pipeline, JetStream publishes and AMQP confirms in flight together): one
round trip and one wake-up of a delivery thread for many messages, not one each.
Each publisher classifies its library's errors
into the delivery policy: connection errors and timeouts are retried on the
schedule, authentication failures and a missing exchange, stream or queue are
permanent (the subscription is disabled with the reason).

The client libraries are optional extras (``motionhook[amqp]``, ``[nats]``,
``[redis]``, ``[aws]``); each kind's module imports its library, and is imported
only when a destination of that kind is first used.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from schemas.destinations import BROKER_KINDS, Destination, parse_destination
from service.config import Settings
from service.notifiers import webhook
from service.notifiers.policy import AttemptResult, Outcome
from service.outbound import TargetRefused, resolve_destination

__all__ = ["BROKER_KINDS", "BrokerPool", "Outgoing", "missing_extra", "outgoing"]

log = logging.getLogger("motionhook.brokers")

SIGNATURE_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")
EVENT_TYPE_HEADER = "event-type"
CONTENT_TYPE = "application/json"
REASON_CHARS = 300
# A publisher nobody used for this long is closed when another one is opened (a
# subscription whose URL changed or that was deleted leaves its publisher behind).
IDLE_CLOSE_SECONDS = 600.0

#: kind -> (module of its client library, extra that installs it, publisher module, class)
KIND_MODULES: dict[str, tuple[str, str, str, str]] = {
    "amqp": ("pika", "amqp", "rabbitmq", "AmqpPublisher"),
    "nats": ("nats", "nats", "jetstream", "NatsPublisher"),
    "redis": ("redis", "redis", "streams", "RedisPublisher"),
    "sqs": ("boto3", "aws", "aws", "SqsPublisher"),
    "eventbridge": ("boto3", "aws", "aws", "EventBridgePublisher"),
}


def missing_extra(kind: str) -> str | None:
    """The extra to install for ``kind`` when its client library is missing, else None."""
    library, extra, _module, _cls = KIND_MODULES[kind]
    return None if importlib.util.find_spec(library) is not None else extra


@dataclass(frozen=True)
class Outgoing:
    """One event as every broker kind publishes it."""

    body: bytes
    headers: dict[str, str]
    event_id: str
    event_type: str
    # FIFO queues group messages by job; events without a job form their own group.
    group_id: str


@dataclass(frozen=True)
class Answer:
    """The broker's acknowledgement, as recorded in the attempt."""

    text: str
    status: int | None = None


def outgoing(
    envelope: Mapping[str, Any], secrets: Sequence[str], serialized: str | None = None
) -> Outgoing:
    """Sign ``envelope`` exactly as a webhook delivery is signed."""
    signed = webhook.render(envelope, secrets, None, serialized)
    event_type = str(envelope.get("type") or "")
    headers = {name: signed.headers[name] for name in SIGNATURE_HEADERS}
    headers[EVENT_TYPE_HEADER] = event_type
    event_id = headers["webhook-id"]
    data = envelope.get("data")
    job_id = data.get("id") if isinstance(data, Mapping) and event_type.startswith("job.") else None
    return Outgoing(
        body=signed.body,
        headers=headers,
        event_id=event_id,
        event_type=event_type,
        group_id=str(job_id or event_id),
    )


class Publisher(ABC):
    """One destination's connection, opened on first use and reused until it fails."""

    def __init__(self, destination: Destination, settings: Settings) -> None:
        self.destination = destination
        self.settings = settings
        self.last_used = time.monotonic()
        self._lock = threading.RLock()
        self._connected = False

    def publish(self, messages: Sequence[Outgoing], timeout: float) -> list[Answer | Exception]:
        """Publish a batch: each message's answer, or the error it met.

        If the kept connection proves dead, reconnect and publish the messages it
        failed once more. Raises only when no connection can be opened at all.
        """
        self.last_used = time.monotonic()
        fresh = self._ensure(timeout)
        results = self._checked(self._send_all(messages, timeout))
        stale = [n for n, result in enumerate(results) if self._is_dead(result)]
        if fresh or not stale or any(isinstance(r, TimeoutError) for r in results):
            return results
        log.info("reconnecting to %s", self.destination.origin)
        try:
            self._ensure(timeout)
        except Exception as exc:
            return [exc if n in stale else result for n, result in enumerate(results)]
        again = self._checked(self._send_all([messages[n] for n in stale], timeout))
        for n, result in zip(stale, again, strict=True):
            results[n] = result
        return results

    def _is_dead(self, result: Answer | Exception) -> bool:
        return isinstance(result, Exception) and self.is_stale(result)

    def _checked(self, results: list[Answer | Exception]) -> list[Answer | Exception]:
        """Forget the connection if a result says it is dead or in an unknown state."""
        if any(isinstance(r, TimeoutError) or self._is_dead(r) for r in results):
            self.drop()
        return results

    def _ensure(self, timeout: float) -> bool:
        """Connect if not connected; return whether this call connected."""
        with self._lock:
            if self._connected:
                return False
            self._open(timeout)
            self._connected = True
            return True

    def drop(self) -> None:
        """Forget the connection (closing it quietly); the next publish reconnects."""
        with self._lock:
            if self._connected:
                self._connected = False
                self._close()

    def close(self) -> None:
        self.drop()

    def address(self) -> str:
        """The host to connect to, checked by the outbound guard (pinned unless TLS)."""
        checked = resolve_destination(
            self.destination.host,
            self.destination.port,
            allow_private=self.settings.allow_private_targets,
            allowed_hosts=self.settings.destination_allowed_hosts,
        )
        # TLS verifies the certificate against the host name, so connect by name there.
        return self.destination.host if self.destination.tls else checked

    @abstractmethod
    def _open(self, timeout: float) -> None:
        """Open the connection (raising the library's errors)."""

    @abstractmethod
    def _close(self) -> None:
        """Close the connection, ignoring errors."""

    @abstractmethod
    def _send_all(self, messages: Sequence[Outgoing], timeout: float) -> list[Answer | Exception]:
        """Publish ``messages`` and wait for the broker's acknowledgements (or errors)."""

    @abstractmethod
    def is_stale(self, error: Exception) -> bool:
        """Tell whether ``error`` means the kept connection is dead (worth reconnecting)."""

    @abstractmethod
    def classify(self, error: Exception) -> Outcome | None:
        """Map a library error to the delivery policy; None for errors it does not know."""


class OneByOne(Publisher):
    """A publisher whose library sends one message per call, each waited for in turn."""

    def _send_all(self, messages: Sequence[Outgoing], timeout: float) -> list[Answer | Exception]:
        results: list[Answer | Exception] = []
        for message in messages:
            try:
                results.append(self._send(message, timeout))
            except Exception as exc:
                results.append(exc)
                if isinstance(exc, TimeoutError) or self.is_stale(exc):
                    # The connection is gone or in doubt: the rest would only wait too.
                    results += [exc] * (len(messages) - len(results))
                    break
        return results

    @abstractmethod
    def _send(self, message: Outgoing, timeout: float) -> Answer:
        """Publish ``message`` and wait for the broker's acknowledgement."""


def _retry_or_none(error: Exception) -> Outcome | None:
    """Outcomes every kind shares: refused targets, timeouts, socket errors."""
    if isinstance(error, TargetRefused):
        return Outcome("failed", str(error))
    if isinstance(error, TimeoutError):
        return Outcome("retry", "timed out waiting for the broker")
    if isinstance(error, ConnectionRefusedError):
        return Outcome("retry", "connection refused")
    if isinstance(error, OSError):
        return Outcome("retry", f"network error ({type(error).__name__})")
    return None


class BrokerPool:
    """The worker's publishers, one per destination URL, shared by its delivery threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._publishers: dict[tuple[str, str], Publisher] = {}
        self._lock = threading.Lock()
        # Every failed attempt is recorded on its delivery; the libraries' own error
        # logs would repeat each one (and pika logs at ERROR, which Sentry reports).
        logging.getLogger("pika").setLevel(logging.CRITICAL)
        logging.getLogger("nats").setLevel(logging.CRITICAL)

    def publisher(self, kind: str, url: str) -> Publisher:
        """The publisher of ``url``, created on first use (ImportError if its extra is missing)."""
        key = (kind, url)
        with self._lock:
            found = self._publishers.get(key)
            if found is not None:
                return found
            _library, _extra, module_name, class_name = KIND_MODULES[kind]
            module = importlib.import_module(f"{__name__}.{module_name}")
            created: Publisher = getattr(module, class_name)(
                parse_destination(kind, url), self.settings
            )
            now = time.monotonic()
            idle = [
                other_key
                for other_key, other in self._publishers.items()
                if now - other.last_used > IDLE_CLOSE_SECONDS
            ]
            closing = [self._publishers.pop(other_key) for other_key in idle]
            self._publishers[key] = created
        for other in closing:
            other.close()
        return created

    def publish(self, kind: str, url: str, messages: Sequence[Outgoing]) -> list[AttemptResult]:
        """Publish a batch to one destination and classify each message's outcome; never
        raises for errors the kind's library is known to raise (others propagate, to Sentry)."""
        started = time.monotonic()
        publisher: Publisher | None = None
        try:
            publisher = self.publisher(kind, url)
            results = publisher.publish(messages, self.settings.delivery_timeout)
        except ImportError:
            extra = KIND_MODULES[kind][1]
            outcome = Outcome("failed", f"{kind} needs the {extra} extra: motionhook[{extra}]")
        except ValueError as exc:
            # A URL stored before validation grew stricter (or TargetRefused).
            outcome = _retry_or_none(exc) or Outcome("failed", f"invalid destination: {exc}")
        except Exception as exc:
            outcome = self._classify(publisher, exc)
        else:
            latency_ms = (time.monotonic() - started) * 1000
            return [self._result(publisher, result, latency_ms) for result in results]
        failed = self._failure(publisher, outcome, (time.monotonic() - started) * 1000)
        return [failed] * len(messages)

    @staticmethod
    def _classify(publisher: Publisher | None, error: Exception) -> Outcome:
        known = publisher.classify(error) if publisher is not None else None
        outcome = known or _retry_or_none(error)
        if outcome is None:
            raise error
        return outcome

    def _result(
        self, publisher: Publisher, result: Answer | Exception, latency_ms: float
    ) -> AttemptResult:
        if isinstance(result, Exception):
            return self._failure(publisher, self._classify(publisher, result), latency_ms)
        return AttemptResult(
            status=result.status,
            latency_ms=latency_ms,
            error=None,
            response_excerpt=result.text,
            outcome=Outcome("delivered", result.text),
            pacing=0.0,
        )

    def _failure(
        self, publisher: Publisher | None, outcome: Outcome, latency_ms: float
    ) -> AttemptResult:
        reason = self._scrub(publisher, outcome.reason)
        return AttemptResult(
            status=None,
            latency_ms=latency_ms,
            error=reason,
            response_excerpt="",
            outcome=Outcome(outcome.result, reason, outcome.retry_after),
            pacing=0.0,
        )

    @staticmethod
    def _scrub(publisher: Publisher | None, reason: str) -> str:
        """Cut ``reason`` short and make sure it never carries the destination's secret."""
        if publisher is not None:
            where = publisher.destination.origin
            reason = f"{reason} ({where})" if where not in reason else reason
            destination = publisher.destination
            # The password, or a NATS token (a user part without a password).
            secret = destination.password
            if secret is None and destination.kind == "nats":
                secret = destination.username
            if secret and len(secret) >= 3:
                reason = reason.replace(secret, "***")
        return reason[:REASON_CHARS]

    def close(self) -> None:
        """Close every connection (the worker is stopping)."""
        with self._lock:
            publishers, self._publishers = list(self._publishers.values()), {}
        for publisher in publishers:
            publisher.close()
