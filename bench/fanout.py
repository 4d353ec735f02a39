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

import json
import os
import time
from collections import Counter
from typing import Any

from sqlalchemy import func, select

from bench.charts import CEILING, MOTIONHOOK, figure, save, target_line
from bench.common import (
    Scale,
    database_url,
    log,
    process_cpu_seconds,
    stack,
    write_result,
)
from bench.ingest import insert_processing_jobs
from bench.sink import Sink
from service.callbacks import receive_callback
from service.config import Settings, load_config
from service.devstack import Process, Stack
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


def build_backlog(running: Stack, sink: Sink, jobs: int) -> int:
    """Subscribe 10 sink paths and fail ``jobs`` jobs by callback; return deliveries made."""
    services = services_for(running)
    db = services.db
    try:
        with db.transaction() as session:
            for number in range(SUBSCRIPTIONS):
                create_subscription(
                    session,
                    DEFAULT_PROJECT_ID,
                    {"kind": "webhook", "url": sink.url(f"sub-{number}"), "events": []},
                    limit=SUBSCRIPTIONS,
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
    jobs = scale.count(2000, 50)
    rows = []
    for workers in WORKERS:
        with stack(f"{NAME}-{workers}", simulator=False) as running:
            sink = Sink(keep_bodies=False)
            try:
                log.info("fanout: building a backlog of %d jobs x %d subs", jobs, SUBSCRIPTIONS)
                expected = build_backlog(running, sink, jobs)
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
    write_result(NAME, data)
    chart(data)
    return data


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
