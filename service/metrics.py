"""Prometheus metrics: counters where things happen, gauges read from the database.

Counters and histograms are incremented by the process that does the work (web:
callbacks and HTTP requests; worker: upstream calls and deliveries). Gauges about
the state of the system (jobs by status, queue depth, oldest due item, disabled
subscriptions) are computed at scrape time by :class:`DatabaseCollector`, so every
web process reports the same, correct numbers however many processes there are.

Under gunicorn several processes serve ``/metrics``; with ``PROMETHEUS_MULTIPROC_DIR``
set (``deploy/gunicorn.conf.py`` sets it) each process writes its counters to that
folder and a scrape adds them up. The worker serves its own ``/metrics`` (and
``/healthz``, ``/readyz``) on ``MOTIONHOOK_WORKER_METRICS_PORT``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import false, func, select
from sqlalchemy.exc import SQLAlchemyError

from service.bearer import bearer_token, is_one_of
from service.migrate import readiness
from service.models import (
    Delivery,
    DeliveryAttempt,
    Job,
    Project,
    Subscription,
    Task,
    UpstreamCapacity,
    utcnow,
)

if TYPE_CHECKING:
    from service.config import Settings
    from service.db import Database
    from service.extension import Services
    from service.upstream import UpstreamAnswer

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
JOB_STATUSES = ("queued", "processing", "completed", "failed")
TASK_KINDS = ("submit", "download", "reconcile")
CHANNELS = ("webhook", "slack", "discord")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0)
DELIVERY_STATUSES = ("pending", "delivered", "failed")
ATTEMPT_OUTCOMES = ("delivered", "retry", "failed", "permanent")
# Windows of the delivery gauges: both are range scans on an indexed timestamp.
RECENT_DELIVERIES = timedelta(hours=24)
RECENT_ATTEMPTS = timedelta(minutes=5)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# One ``*_created`` series per labelled child doubles the series count for no use here.
disable_created_metrics()  # type: ignore[no-untyped-call]

UPSTREAM_REQUESTS = Counter(
    "motionhook_upstream_requests",
    "Calls to ModelsLab by operation (submit, fetch) and outcome (result, rejected, retry).",
    ["operation", "outcome"],
)
UPSTREAM_LATENCY = Histogram(
    "motionhook_upstream_request_duration_seconds",
    "Time ModelsLab took to answer, by operation.",
    ["operation"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_RATE_LIMITED = Counter(
    "motionhook_upstream_rate_limited",
    "429 answers from ModelsLab (its queued-request cap), by operation.",
    ["operation"],
)
QUEUE_WAIT = Histogram(
    "motionhook_queue_wait_seconds",
    "Time a job waited in motionhook's queue for a ModelsLab slot, by operation (submit).",
    ["operation"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
)
CALLBACKS = Counter(
    "motionhook_callbacks_received",
    "ModelsLab callbacks by outcome: applied, duplicate, ignored (late), malformed, "
    "mismatch, unknown_job, rejected (bad or missing sig).",
    ["outcome"],
)
DELIVERIES = Counter(
    "motionhook_delivery_attempts",
    "Delivery attempts by channel (webhook, slack, discord) and outcome "
    "(delivered, retry, failed, permanent).",
    ["channel", "outcome"],
)
DELIVERY_LATENCY = Histogram(
    "motionhook_delivery_duration_seconds",
    "Time one delivery attempt took, by channel.",
    ["channel"],
    buckets=LATENCY_BUCKETS,
)
SUBSCRIPTIONS_DISABLED = Counter(
    "motionhook_subscription_disablements",
    "Subscriptions disabled by the delivery policy (permanent failure or failing too long).",
    ["channel"],
)
HTTP_REQUESTS = Counter(
    "motionhook_http_requests",
    "HTTP requests served by the web process, by method, route and status code.",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "motionhook_http_request_duration_seconds",
    "Time the web process took to answer, by route.",
    ["route"],
    buckets=HTTP_BUCKETS,
)


def record_upstream(operation: str, answer: UpstreamAnswer) -> None:
    UPSTREAM_REQUESTS.labels(operation, answer.kind).inc()
    UPSTREAM_LATENCY.labels(operation).observe(answer.latency)
    if answer.http_status == 429:
        UPSTREAM_RATE_LIMITED.labels(operation).inc()


def record_queue_wait(seconds: float) -> None:
    QUEUE_WAIT.labels("submit").observe(max(0.0, seconds))


def record_callback(outcome: str) -> None:
    CALLBACKS.labels(outcome).inc()


def record_delivery(channel: str, outcome: str, latency_seconds: float) -> None:
    DELIVERIES.labels(channel, outcome).inc()
    DELIVERY_LATENCY.labels(channel).observe(latency_seconds)


def record_subscription_disabled(channel: str) -> None:
    SUBSCRIPTIONS_DISABLED.labels(channel).inc()


def record_http(method: str, route: str, status: int, seconds: float) -> None:
    HTTP_REQUESTS.labels(method, route, str(status)).inc()
    HTTP_LATENCY.labels(route).observe(seconds)


def _as_utc(value: Any) -> datetime | None:
    """``func.min`` bypasses the column type on SQLite: accept text and naive values."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _pairs(rows: Iterable[Any]) -> dict[Any, Any]:
    """Turn ``(key, value)`` rows into a dict (a ``Result`` is not a mapping)."""
    return {row[0]: row[1] for row in rows}


class DatabaseCollector:
    """Gauges computed from the database at scrape time (right across every process)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        up = GaugeMetricFamily(
            "motionhook_database_up", "1 when the database answered the metrics queries."
        )
        try:
            families = self._query()
        except SQLAlchemyError:
            up.add_metric([], 0)
            families = []
        else:
            up.add_metric([], 1)
        yield up
        yield from families
        took = GaugeMetricFamily(
            "motionhook_metrics_query_duration_seconds",
            "Time the database gauges took to compute in this scrape.",
        )
        took.add_metric([], time.perf_counter() - started)
        yield took

    def _query(self) -> list[Metric]:
        # Not at the top: the capacity module records its queue waits here.
        from service.capacity import DEFAULT_ACCOUNT, job_account

        now = utcnow()
        jobs = GaugeMetricFamily("motionhook_jobs", "Jobs by status.", labels=["status"])
        oldest_job = GaugeMetricFamily(
            "motionhook_job_oldest_age_seconds",
            "Age of the oldest job still queued or processing (0 when none).",
            labels=["status"],
        )
        depth = GaugeMetricFamily(
            "motionhook_queue_depth",
            "Work items due now and waiting for a worker, by queue and kind.",
            labels=["queue", "kind"],
        )
        oldest_due = GaugeMetricFamily(
            "motionhook_queue_oldest_due_age_seconds",
            "How long the oldest due work item has waited for a worker (0 when none).",
            labels=["queue", "kind"],
        )
        pending = GaugeMetricFamily(
            "motionhook_queue_pending",
            "All unfinished work items: due, leased to a worker, or scheduled for a retry.",
            labels=["queue", "kind"],
        )
        disabled = GaugeMetricFamily(
            "motionhook_subscriptions_disabled",
            "Subscriptions currently disabled, by channel.",
            labels=["channel"],
        )
        deliveries = GaugeMetricFamily(
            "motionhook_deliveries_last_day",
            "Deliveries created in the last 24 hours, by channel and status.",
            labels=["kind", "status"],
        )
        attempts = GaugeMetricFamily(
            "motionhook_delivery_attempts_recent",
            "Delivery attempts of the last 5 minutes by outcome "
            "(delivered, retry, failed, permanent).",
            labels=["outcome"],
        )
        capacity = GaugeMetricFamily(
            "motionhook_upstream_slots",
            "ModelsLab queued-request slots by account (default: the instance's key; key_…: "
            "a project's own key): in use, jobs waiting for one, and the cap in force.",
            labels=["account", "state"],
        )
        with self.db.transaction() as session:
            in_use = _pairs(
                session.execute(
                    select(Job.upstream_account, func.count())
                    .where(Job.upstream_slot_since.is_not(None))
                    .group_by(Job.upstream_account)
                )
            )
            waiting = _pairs(
                session.execute(
                    select(job_account(), func.count())
                    .select_from(Job)
                    .outerjoin(Project, Project.id == Job.project_id)
                    .where(Job.upstream_slot_since.is_(None), Job.status == "queued")
                    .group_by(job_account())
                )
            )
            caps = _pairs(
                session.execute(select(UpstreamCapacity.account, UpstreamCapacity.effective_cap))
            )
            by_status = _pairs(
                session.execute(select(Job.status, func.count()).group_by(Job.status))
            )
            job_ages = _pairs(
                session.execute(
                    select(Job.status, func.min(Job.created_at))
                    .where(Job.status.in_(("queued", "processing")))
                    .group_by(Job.status)
                )
            )
            task_due = {
                kind: (count, oldest)
                for kind, count, oldest in session.execute(
                    select(Task.kind, func.count(), func.min(Task.due_at))
                    .where(Task.due_at <= now)
                    .group_by(Task.kind)
                )
            }
            task_all = _pairs(session.execute(select(Task.kind, func.count()).group_by(Task.kind)))
            pending_deliveries = Delivery.status == "pending"
            delivery_due = {
                kind: (count, oldest)
                for kind, count, oldest in session.execute(
                    select(Delivery.kind, func.count(), func.min(Delivery.due_at))
                    .where(pending_deliveries, Delivery.due_at <= now)
                    .group_by(Delivery.kind)
                )
            }
            delivery_all = _pairs(
                session.execute(
                    select(Delivery.kind, func.count())
                    .where(pending_deliveries)
                    .group_by(Delivery.kind)
                )
            )
            recent_deliveries = {
                (kind, status): count
                for kind, status, count in session.execute(
                    select(Delivery.kind, Delivery.status, func.count())
                    .where(Delivery.created_at >= now - RECENT_DELIVERIES)
                    .group_by(Delivery.kind, Delivery.status)
                )
            }
            recent_attempts = _pairs(
                session.execute(
                    select(DeliveryAttempt.outcome, func.count())
                    .where(DeliveryAttempt.attempted_at >= now - RECENT_ATTEMPTS)
                    .group_by(DeliveryAttempt.outcome)
                )
            )
            disabled_by_kind = _pairs(
                session.execute(
                    select(Subscription.kind, func.count())
                    .where(Subscription.enabled == false())
                    .group_by(Subscription.kind)
                )
            )
        for status in sorted(set(JOB_STATUSES) | set(by_status)):
            jobs.add_metric([status], by_status.get(status, 0))
        for status in ("queued", "processing"):
            created = _as_utc(job_ages.get(status))
            oldest_job.add_metric([status], (now - created).total_seconds() if created else 0.0)
        queues: list[tuple[str, Iterable[str], dict[str, Any], dict[str, Any]]] = [
            ("tasks", TASK_KINDS, task_due, task_all),
            ("deliveries", CHANNELS, delivery_due, delivery_all),
        ]
        for queue, kinds, due, every in queues:
            for kind in sorted(set(kinds) | set(due) | set(every)):
                count, oldest = due.get(kind, (0, None))
                since = _as_utc(oldest)
                depth.add_metric([queue, kind], count)
                age = max(0.0, (now - since).total_seconds()) if since else 0.0
                oldest_due.add_metric([queue, kind], age)
                pending.add_metric([queue, kind], every.get(kind, 0))
        for channel in sorted(set(CHANNELS) | set(disabled_by_kind)):
            disabled.add_metric([channel], disabled_by_kind.get(channel, 0))
        kinds = sorted(set(CHANNELS) | {kind for kind, _status in recent_deliveries})
        statuses = sorted(set(DELIVERY_STATUSES) | {status for _kind, status in recent_deliveries})
        for kind in kinds:
            for status in statuses:
                deliveries.add_metric([kind, status], recent_deliveries.get((kind, status), 0))
        for outcome in sorted(set(ATTEMPT_OUTCOMES) | set(recent_attempts)):
            attempts.add_metric([outcome], recent_attempts.get(outcome, 0))
        for account in sorted({DEFAULT_ACCOUNT, *in_use, *waiting, *caps}):
            capacity.add_metric([account, "in_use"], in_use.get(account, 0))
            capacity.add_metric([account, "waiting"], waiting.get(account, 0))
            capacity.add_metric([account, "cap"], caps.get(account) or 0)
        return [
            jobs,
            oldest_job,
            depth,
            oldest_due,
            pending,
            disabled,
            deliveries,
            attempts,
            capacity,
        ]


class _ProcessRegistry:
    """Forward this process's own metrics (default registry) into a scrape registry."""

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def exposition(db: Database | None) -> bytes:
    """Render every metric of this process (or of all processes sharing the multiproc dir)."""
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(_ProcessRegistry())
    if db is not None:
        registry.register(DatabaseCollector(db))
    return generate_latest(registry)


def metrics_refusal(settings: Settings, authorization: str | None) -> tuple[int, str] | None:
    """Why a scrape is refused, as (HTTP status, message), or None when it is allowed.

    With ``MOTIONHOOK_METRICS_TOKEN`` set, the scrape must bear it. Without one,
    production keeps the metrics closed unless ``MOTIONHOOK_METRICS_PUBLIC=1``.
    """
    if settings.metrics_token:
        token = bearer_token(authorization)
        if token is not None and is_one_of(token, (settings.metrics_token,)):
            return None
        return 401, "metrics need the metrics token (Authorization: Bearer <token>)"
    if settings.metrics_public:
        return None
    return 403, (
        "metrics are closed in production: set MOTIONHOOK_METRICS_TOKEN and scrape with it "
        "as a bearer token, or open them with MOTIONHOOK_METRICS_PUBLIC=1"
    )


# -- the worker's own small HTTP endpoint ---------------------------------------


class Heartbeat:
    """The worker's main loop beats every iteration; liveness checks its age."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._last = clock()

    def beat(self) -> None:
        self._last = self.clock()

    def age(self) -> float:
        return self.clock() - self._last


HEARTBEAT = Heartbeat()
# The main loop waits at most a second between beats; a minute of silence means stuck.
HEARTBEAT_STALE = 60.0


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Probes and scrapes every few seconds would drown the logs."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def worker_wsgi_app(services: Services, heartbeat: Heartbeat = HEARTBEAT) -> WsgiApp:
    """``/metrics``, ``/healthz`` (main loop alive) and ``/readyz`` for the worker process."""
    settings = services.settings

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            refusal = metrics_refusal(settings, environ.get("HTTP_AUTHORIZATION"))
            if refusal is not None:
                code, message = refusal
                body = {"code": code, "status": HTTPStatus(code).phrase, "message": message}
                return _json(start_response, code, body)
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [exposition(None)]
        if path == "/healthz":
            age = heartbeat.age()
            alive = age < HEARTBEAT_STALE
            body = {"status": "ok" if alive else "stuck", "loop_age_seconds": round(age, 3)}
            return _json(start_response, 200 if alive else 503, body)
        if path == "/readyz":
            status = readiness(services.db)
            return _json(start_response, 200 if status["ready"] else 503, status)
        return _json(
            start_response,
            404,
            {"code": 404, "status": "Not Found", "message": "try /metrics, /healthz or /readyz"},
        )

    return app


def _json(start_response: Callable[..., Any], code: int, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        f"{code} {HTTPStatus(code).phrase}",
        [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
    )
    return [data]


def start_worker_server(services: Services, host: str, port: int) -> WSGIServer:
    """Serve the worker's metrics and probes from a daemon thread; return the server."""
    server = make_server(host, port, worker_wsgi_app(services), _ThreadingServer, _QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    return server
