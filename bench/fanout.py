"""Fan-out throughput: deliveries per second from one, then two, worker processes.

A backlog is built the way production builds it: jobs fail through
``service.callbacks.receive_callback`` (what ``web`` runs for a callback), and each
``job.failed`` event gets one delivery per subscription: signed Standard Webhooks
to 10 local sink paths. Then ``motionhook worker`` processes start and drain it.
The rate is counted at the sink, from the first delivery received to the last.
Afterwards every (event, subscription) pair must have arrived exactly once and
every delivery must be ``delivered`` after one attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import boto3
import nats
import pika
import redis
import requests
from sqlalchemy import func, select

from bench.charts import CEILING, MOTIONHOOK, figure, save, target_line
from bench.common import (
    Scale,
    database_url,
    log,
    process_cpu_seconds,
    python,
    read_result,
    stack,
    wait_for,
    write_result,
)
from bench.ingest import insert_processing_jobs
from bench.sink import Sink
from service.callbacks import receive_callback
from service.config import Settings, load_config
from service.devstack import Process, Stack, free_port
from service.extension import Services
from service.models import DEFAULT_PROJECT_ID, Delivery, DeliveryAttempt, Subscription
from service.subscriptions import create_subscription

NAME = "fanout"
SUBSCRIPTIONS = 10
TARGET_RATE = 1000.0
WORKERS = (1, 2)


def services_for(running: Stack) -> Services:
    """The services ``web`` builds, in this process, on the benchmark database.

    Built from settings rather than ``create_app`` so that the app's logging set-up
    does not take over this process's output.
    """
    return Services.build(Settings.from_mapping(load_config(environ=running.env), running.instance))


def build_backlog(running: Stack, targets: list[tuple[str, str]], jobs: int) -> int:
    """Subscribe ``(kind, url)`` targets and fail ``jobs`` jobs by callback; return deliveries."""
    services = services_for(running)
    db = services.db
    try:
        with db.transaction() as session:
            for kind, url in targets:
                create_subscription(
                    session,
                    DEFAULT_PROJECT_ID,
                    {"kind": kind, "url": url, "events": []},
                    limit=len(targets),
                )
        made = insert_processing_jobs(database_url(running), jobs)
        for job_id, upstream_id in made:
            body = {
                "status": "failed",
                "id": upstream_id,
                "message": "Video generation failed (benchmark)",
                "track_id": job_id,
            }
            outcome = receive_callback(
                db,
                job_id,
                json.dumps(body).encode(),
                callback_grace=services.settings.callback_grace,
                job_timeout=services.settings.job_timeout,
                media_url=services.media_url,
                api_key=services.settings.modelslab_api_key,
                max_per_job=services.settings.max_callbacks_per_job,
            )
            assert outcome.outcome == "applied", outcome
        with db.transaction() as session:
            total: int = session.scalar(select(func.count()).select_from(Delivery)) or 0
    finally:
        db.dispose()
    return total


def verify(running: Stack, sink: Sink, expected: int) -> dict[str, Any]:
    receipts = sink.snapshot()
    pairs = Counter((receipt.webhook_id, receipt.path) for receipt in receipts)
    services = services_for(running)
    try:
        with services.db.transaction() as session:
            statuses = dict(
                session.execute(
                    select(Delivery.status, func.count()).group_by(Delivery.status)
                ).all()
            )
            attempts = session.scalar(select(func.count()).select_from(DeliveryAttempt)) or 0
            disabled = (
                session.scalar(
                    select(func.count())
                    .select_from(Subscription)
                    .where(Subscription.enabled.is_(False))
                )
                or 0
            )
    finally:
        services.db.dispose()
    return {
        "deliveries": expected,
        "received": len(receipts),
        "distinct_received": len(pairs),
        "duplicates": sum(count - 1 for count in pairs.values()),
        "lost": expected - len(pairs),
        "delivery_statuses": statuses,
        "attempts": attempts,
        "subscriptions_disabled": disabled,
    }


def drain(running: Stack, sink: Sink, workers: int, expected: int) -> dict[str, Any]:
    """Start ``workers`` worker processes and time them draining ``expected`` deliveries."""
    started = time.time()
    processes: list[Process] = [running.start_worker() for _ in range(workers)]
    deadline = time.monotonic() + 600

    def alive() -> None:
        if any(p.popen.poll() is not None for p in processes):
            raise RuntimeError("a worker exited:\n" + processes[0].log()[-3000:])

    while sink.count() == 0 and time.monotonic() < deadline:
        alive()
        time.sleep(0.01)
    # CPU from the first delivery on: the interpreter's start-up is not fan-out work.
    cpu_before = {p.popen.pid: process_cpu_seconds(p.popen.pid) for p in processes}
    counted_from = sink.count()
    while sink.count() < expected and time.monotonic() < deadline:
        alive()
        time.sleep(0.1)
    cpu = sum(process_cpu_seconds(pid) - before for pid, before in cpu_before.items())
    counted = sink.count() - counted_from
    # Give stragglers (duplicates) a moment to show up before counting.
    time.sleep(1.0)
    receipts = sink.snapshot()
    times = sorted(receipt.at for receipt in receipts)
    first, last = (times[0], times[-1]) if times else (started, started)
    span = max(last - first, 1e-9)
    timeline = _timeline(times, first)
    for process in processes:
        process.stop()
    return {
        "workers": workers,
        "deliveries_per_s": round((len(times) - 1) / span, 1) if len(times) > 1 else 0.0,
        "drain_seconds": round(span, 2),
        "seconds_from_start_to_last": round(last - started, 2),
        "worker_cpu_seconds": round(cpu, 2),
        "worker_cpu_ms_per_delivery": round(cpu * 1000 / max(1, counted), 3),
        "timeline": timeline,
    }


def _timeline(times: list[float], first: float) -> list[list[float]]:
    """Deliveries received per 0.5 s bucket, for the chart."""
    buckets: Counter[int] = Counter(int((at - first) / 0.5) for at in times)
    return [[round(index * 0.5, 1), buckets.get(index, 0) * 2] for index in range(max(buckets) + 1)]


def run(scale: Scale) -> dict[str, Any]:
    """Webhooks (1 and 2 workers), then one worker to each broker kind.

    ``MOTIONHOOK_BENCH_FANOUT_KINDS`` (comma-separated, default all) picks what runs;
    rows of kinds not run are kept from the previous result.
    """
    wanted = os.environ.get("MOTIONHOOK_BENCH_FANOUT_KINDS", ",".join(ALL_KINDS)).split(",")
    previous = read_result(NAME) or {}
    if "webhook" in wanted:
        data = _webhooks(scale)
    else:
        # The webhook rows of the previous run, with where and when they were measured
        # (write_result stamps this run's own).
        data = {key: value for key, value in previous.items() if key not in RUN_STAMP}
        data.setdefault("webhook_run", {key: previous.get(key) for key in RUN_STAMP})
    rows = {row["kind"]: row for row in previous.get("brokers", [])}
    with contextlib.ExitStack() as servers:
        endpoint = ""
        if {"sqs", "eventbridge"} & set(wanted):
            endpoint = servers.enter_context(moto_endpoint())
        for kind in BROKER_KINDS:
            if kind in wanted:
                full = AWS_EVENTS if kind in ("sqs", "eventbridge") else BROKER_EVENTS
                rows[kind] = broker_row(kind, scale.count(full, 200), endpoint)
                rows[kind]["load_average_at_end"] = round(os.getloadavg()[0], 2)
                # Written after each kind, so an interrupted run keeps what it measured.
                _with_brokers(data, rows)
                write_result(NAME, data)
    if "webhook" in wanted:
        _with_brokers(data, rows)
        write_result(NAME, data)
    chart(data)
    return data


def _with_brokers(data: dict[str, Any], rows: dict[str, dict[str, Any]]) -> None:
    """Put the broker rows and their targets into ``data``."""
    data["brokers"] = [rows[kind] for kind in BROKER_KINDS if kind in rows]
    data["targets"] = {
        key: met for key, met in data.get("targets", {}).items() if not key.startswith("broker")
    }
    for row in data["brokers"]:
        target = BROKER_TARGETS.get(row["kind"])
        label = f"broker {row['kind']}: 0 lost, 0 duplicated" + (
            f", >= {target:,.0f}/s" if target else ""
        )
        data["targets"][label] = (
            row["lost"] == 0
            and row["duplicates"] == 0
            and (target is None or row["deliveries_per_s"] >= target)
        )


def _webhooks(scale: Scale) -> dict[str, Any]:
    jobs = scale.count(2000, 50)
    rows = []
    for workers in WORKERS:
        with stack(f"{NAME}-{workers}", simulator=False) as running:
            sink = Sink(keep_bodies=False)
            try:
                log.info("fanout: building a backlog of %d jobs x %d subs", jobs, SUBSCRIPTIONS)
                targets = [("webhook", sink.url(f"sub-{n}")) for n in range(SUBSCRIPTIONS)]
                expected = build_backlog(running, targets, jobs)
                log.info("fanout: %d deliveries pending; starting %d worker(s)", expected, workers)
                row = drain(running, sink, workers, expected)
                row.update(verify(running, sink, expected))
            finally:
                sink.close()
            log.info(
                "fanout %d worker(s): %.0f deliveries/s, %d lost, %d duplicates",
                workers,
                row["deliveries_per_s"],
                row["lost"],
                row["duplicates"],
            )
            rows.append(row)
    one, two = rows
    ratio = two["deliveries_per_s"] / one["deliveries_per_s"] if one["deliveries_per_s"] else 0.0
    data = {
        "description": (
            f"{jobs} job.failed events x {SUBSCRIPTIONS} webhook subscriptions "
            f"= {one['deliveries']} signed deliveries to local sinks, drained by "
            "motionhook worker processes on PostgreSQL (default MOTIONHOOK_DELIVERY_THREADS)."
        ),
        "config": {
            "jobs": jobs,
            "subscriptions": SUBSCRIPTIONS,
            "delivery_threads": int(os.environ.get("MOTIONHOOK_DELIVERY_THREADS", "8")),
        },
        "rows": rows,
        "scaling_ratio": round(ratio, 2),
        "targets": {
            ">= 1,000 deliveries/s from one worker": one["deliveries_per_s"] >= TARGET_RATE,
            "2 workers: no duplicates": two["duplicates"] == 0,
            "2 workers: no losses": two["lost"] == 0,
            "1 worker: no duplicates, no losses": one["duplicates"] == 0 and one["lost"] == 0,
        },
    }
    return data


# -- broker destinations ---------------------------------------------------

BROKER_KINDS = ("redis", "nats", "amqp", "sqs", "eventbridge")
ALL_KINDS = ("webhook", *BROKER_KINDS)
BROKER_TARGETS = {"redis": 2000.0, "nats": 2000.0, "amqp": 1000.0}
BROKER_EVENTS = 20_000
# SQS and EventBridge run against moto, a local fake whose speed is not AWS's (and
# which slows down as its queue grows): a smaller count, and no target.
AWS_EVENTS = 1_000
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}
READ_BATCH = 1000
RUN_STAMP = ("benchmark", "finished_at", "source", "machine", "load_average_at_end")


@contextlib.contextmanager
def moto_endpoint() -> Iterator[str]:
    """A moto server (SQS, EventBridge) on a free loopback port."""
    port = free_port()
    server = subprocess.Popen(
        [python(), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(url), timeout=30, what="moto")
        yield url
    finally:
        server.terminate()
        server.wait(10)


def _answers(url: str) -> bool:
    try:
        requests.get(url, timeout=1)
    except requests.RequestException:
        return False
    return True


def _aws(service: str, endpoint: str) -> Any:
    session = boto3.session.Session(
        aws_access_key_id="bench", aws_secret_access_key="bench", region_name="us-east-1"
    )
    return session.client(service, endpoint_url=endpoint)  # type: ignore[call-overload]


class Target:
    """A fresh exchange/stream/queue/bus for one kind, and a bulk reader of what arrived."""

    def __init__(self, kind: str, endpoint: str) -> None:
        self.kind = kind
        self.name = f"mh-bench-{uuid.uuid4().hex[:8]}"
        self.url = getattr(self, f"_make_{kind}")(endpoint)

    def _make_redis(self, _endpoint: str) -> str:
        return f"redis://127.0.0.1:6379/0?stream={self.name}"

    def _make_nats(self, _endpoint: str) -> str:
        self.stream = self.name.replace("-", "_").upper()
        self._nats("create")
        return f"nats://127.0.0.1:4222/{self.stream.lower()}.events"

    def _amqp_channel(self) -> Any:
        # A connection per use: an idle blocking connection misses its heartbeats.
        connection = pika.BlockingConnection(pika.URLParameters("amqp://127.0.0.1/"))
        return connection.channel()

    def _make_amqp(self, _endpoint: str) -> str:
        channel = self._amqp_channel()
        channel.exchange_declare(self.name, exchange_type="topic")
        channel.queue_declare(self.name, durable=True)
        channel.queue_bind(self.name, self.name, "#")
        channel.connection.close()
        return f"amqp://guest:guest@127.0.0.1:5672/?exchange={self.name}"

    def _make_sqs(self, endpoint: str) -> str:
        self.sqs = _aws("sqs", endpoint)
        self.queue: str = self.sqs.create_queue(QueueName=self.name)["QueueUrl"]
        return self.queue

    def _make_eventbridge(self, endpoint: str) -> str:
        queue = self._make_sqs(endpoint)
        arn = self.sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])
        events = _aws("events", endpoint)
        events.create_event_bus(Name=self.name)
        events.put_rule(
            Name="all", EventBusName=self.name, EventPattern='{"source":["motionhook"]}'
        )
        target = {"Id": "q", "Arn": arn["Attributes"]["QueueArn"]}
        events.put_targets(Rule="all", EventBusName=self.name, Targets=[target])
        return f"eventbridge://{self.name}?region=us-east-1"

    def _nats(self, action: str) -> list[str]:
        async def call() -> list[str]:
            client = await nats.connect("nats://127.0.0.1:4222")
            stream = client.jetstream()
            ids: list[str] = []
            try:
                if action == "create":
                    await stream.add_stream(name=self.stream, subjects=[f"{self.stream.lower()}.>"])
                elif action == "delete":
                    await stream.delete_stream(self.stream)
                else:
                    reader = await stream.pull_subscribe(
                        f"{self.stream.lower()}.>", stream=self.stream
                    )
                    while True:
                        try:
                            batch = await reader.fetch(READ_BATCH, timeout=2)
                        except nats.errors.TimeoutError:
                            return ids
                        ids += [(message.headers or {}).get("webhook-id", "") for message in batch]
                        for message in batch:
                            await message.ack()
            finally:
                await client.close()
            return ids

        return asyncio.run(call())

    def received_ids(self) -> list[str]:
        """The ``webhook-id`` (or event id) of every message the destination holds."""
        if self.kind == "redis":
            client = redis.Redis()
            entries = client.xrange(self.name)
            client.delete(self.name)
            return [fields[b"webhook-id"].decode() for _id, fields in entries]
        if self.kind == "nats":
            ids = self._nats("read")
            self._nats("delete")
            return ids
        if self.kind == "amqp":
            channel = self._amqp_channel()
            found = []
            for _method, properties, _body in channel.consume(
                self.name, auto_ack=True, inactivity_timeout=2
            ):
                if properties is None:  # nothing for 2 s: the queue is drained
                    break
                found.append(properties.message_id)
            channel.cancel()
            channel.queue_delete(self.name)
            channel.exchange_delete(self.name)
            channel.connection.close()
            return found
        ids = []
        while True:
            answer = self.sqs.receive_message(
                QueueUrl=self.queue, MaxNumberOfMessages=10, MessageAttributeNames=["All"]
            )
            messages = answer.get("Messages", [])
            if not messages:
                return ids
            for message in messages:
                if self.kind == "sqs":
                    ids.append(message["MessageAttributes"]["webhook-id"]["StringValue"])
                else:
                    ids.append(json.loads(message["Body"])["detail"]["id"])
            self.sqs.delete_message_batch(
                QueueUrl=self.queue,
                Entries=[
                    {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]}
                    for n, m in enumerate(messages)
                ],
            )


DELIVERED_SO_FAR = select(func.count()).select_from(Delivery).where(Delivery.status == "delivered")


def broker_row(kind: str, events: int, endpoint: str) -> dict[str, Any]:
    """One worker process draining ``events`` deliveries to one destination of ``kind``."""
    env = {**AWS_ENV, "MOTIONHOOK_AWS_ENDPOINT_URL": endpoint} if endpoint else {}
    # A database of its own: other benchmarks recreate the shared one.
    with stack(
        f"{NAME}-{kind}", simulator=False, database=f"motionhook_bench_fanout_{kind}", **env
    ) as running:
        target = Target(kind, endpoint)
        log.info("fanout %s: building a backlog of %d events", kind, events)
        expected = build_backlog(running, [(kind, target.url)], events)
        services = services_for(running)
        try:
            worker = running.start_worker()

            def delivered() -> int:
                if worker.popen.poll() is not None:
                    raise RuntimeError(f"the worker exited:\n{worker.log()[-3000:]}")
                with services.db.transaction() as session:
                    return session.scalar(DELIVERED_SO_FAR) or 0

            wait_for(delivered, timeout=120, interval=0.01, what=f"a first {kind} delivery")
            cpu_before = process_cpu_seconds(worker.popen.pid)
            wait_for(lambda: delivered() >= expected, timeout=900, what=f"{expected} to {kind}")
            cpu = process_cpu_seconds(worker.popen.pid) - cpu_before
            worker.stop()
            with services.db.transaction() as session:
                first, last = session.execute(
                    select(func.min(Delivery.delivered_at), func.max(Delivery.delivered_at))
                ).one()
                attempts = session.scalar(select(func.count()).select_from(DeliveryAttempt)) or 0
        finally:
            services.db.dispose()
        ids = target.received_ids()
    span = max((last - first).total_seconds(), 1e-9)
    row = {
        "kind": kind,
        "deliveries": expected,
        "deliveries_per_s": round((expected - 1) / span, 1),
        "drain_seconds": round(span, 2),
        "attempts": attempts,
        "worker_cpu_ms_per_delivery": round(cpu * 1000 / expected, 3),
        "received": len(ids),
        "duplicates": len(ids) - len(set(ids)),
        "lost": expected - len(set(ids)),
    }
    log.info(
        "fanout %s: %.0f deliveries/s, %d lost, %d duplicates",
        kind,
        row["deliveries_per_s"],
        row["lost"],
        row["duplicates"],
    )
    return row


def chart(data: dict[str, Any]) -> None:
    fig, (left, right) = figure(2)
    rows = data["rows"]
    labels = [f"{row['workers']} worker{'s' if row['workers'] > 1 else ''}" for row in rows]
    rates = [row["deliveries_per_s"] for row in rows]
    left.bar(labels, rates, color=[MOTIONHOOK, CEILING][: len(rows)], width=0.5)
    for index, rate in enumerate(rates):
        left.annotate(f"{rate:.0f}/s", (index, rate), ha="center", va="bottom", fontsize=8)
    target_line(left, TARGET_RATE, "target 1,000/s (one worker)")
    left.set_ylabel("deliveries / s")
    left.set_title(f"Fan-out throughput (scaling x{data['scaling_ratio']})", fontsize=10)
    for row, color in zip(rows, (MOTIONHOOK, CEILING), strict=False):
        xs = [point[0] for point in row["timeline"]]
        ys = [point[1] for point in row["timeline"]]
        right.plot(xs, ys, color=color, label=f"{row['workers']} worker(s)")
    right.set_xlabel("seconds since first delivery")
    right.set_ylabel("deliveries / s (0.5 s buckets)")
    right.set_title("Drain timeline", fontsize=10)
    right.legend(fontsize=8, frameon=False)
    save(fig, NAME)
