"""Notify latency: from the simulator sending a callback to a local sink receiving the event.

The whole product path runs: ``POST /v1/jobs`` → worker submits to the simulator →
the simulator calls back → ``web`` stores the callback and writes the event and its
deliveries → the worker is woken by ``NOTIFY`` and delivers signed webhooks to the sink.

- ``job.failed`` is the fast path: the event is written in the callback's own
  transaction, so the latency is motionhook's notification latency alone.
- ``job.completed`` is sent only after the worker has downloaded the output from
  the simulator and stored it, so it includes that download.

The simulator stamps ``sent_at`` (wall clock) just before it POSTs the callback;
the sink stamps ``time.time()`` when a request has fully arrived. Same machine,
same clock. For 10 subscriptions each job yields 10 notifications: the table
shows every notification, and "last of 10" (when the job's last one arrived).
"""

from __future__ import annotations

import json
import math
import threading
import time
from datetime import datetime
from typing import Any

import requests

from bench.charts import ACCENT, CEILING, MOTIONHOOK, figure, save
from bench.common import Scale, distribution, log, percentile, stack, write_result
from bench.sink import Sink
from service.devstack import Stack

NAME = "notify"
SUBSCRIPTIONS = (1, 10)
PATHS = {"failed": "job.failed", "completed": "job.completed"}
RATE = 10.0
SIM_DELAY = 0.5
POLL_INTERVAL = 60.0
TARGET_P50_MS = 30.0
TARGET_P99_MS = 150.0
GENERATION_TIMES = (45, 300, 960)


def job_body(sim_url: str) -> dict[str, Any]:
    return {
        "init_image": f"{sim_url}/_sim/sample.png",
        "prompt": "a slow zoom over the hills",
        "width": 64,
        "height": 64,
        "num_frames": 2,
        "fps": 8,
    }


def subscribe(api: requests.Session, running: Stack, sink: Sink, number: int) -> None:
    response = api.post(
        f"{running.web_url}/v1/subscriptions",
        json={
            "kind": "webhook",
            "url": sink.url(f"sub-{number}"),
            "events": list(PATHS.values()),
            "description": f"bench sink {number}",
        },
        timeout=10,
    )
    response.raise_for_status()


def submit_paced(api: requests.Session, running: Stack, count: int, rate: float) -> list[str]:
    """Submit ``count`` jobs at ``rate`` per second; return their ids."""
    ids = []
    began = time.monotonic()
    body = job_body(running.sim_url)
    for number in range(count):
        delay = began + number / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        response = api.post(f"{running.web_url}/v1/jobs", json=body, timeout=10)
        response.raise_for_status()
        ids.append(response.json()["id"])
    return ids


def collect_callbacks(running: Stack, sent_at: dict[str, float]) -> dict[str, Any]:
    """Add the simulator's recent callbacks (first copy) to ``sent_at``; return its stats."""
    stats: dict[str, Any] = requests.get(f"{running.sim_url}/_sim/stats", timeout=10).json()
    for record in stats["recent_callbacks"]:
        if record["copy"] == 0 and record["track_id"]:
            stamp = datetime.fromisoformat(record["sent_at"]).timestamp()
            sent_at.setdefault(record["track_id"], stamp)
    return stats


def measure(
    running: Stack, api: requests.Session, sink: Sink, subs: int, path: str, jobs: int
) -> dict[str, Any]:
    event_type = PATHS[path]
    requests.post(f"{running.sim_url}/_sim/reset", json={}, timeout=10).raise_for_status()
    requests.put(
        f"{running.sim_url}/_sim/knobs",
        json={"fail_generation": path == "failed", "delay": SIM_DELAY},
        timeout=10,
    ).raise_for_status()
    sink.clear()
    sent_at: dict[str, float] = {}
    ids: list[str] = []
    submitter = threading.Thread(
        target=lambda: ids.extend(submit_paced(api, running, jobs, RATE)), daemon=True
    )
    submitter.start()
    deadline = time.monotonic() + jobs / RATE + 120
    expected = jobs * subs
    stats: dict[str, Any] = {}
    while time.monotonic() < deadline:
        stats = collect_callbacks(running, sent_at)
        if sink.count() >= expected and len(sent_at) >= jobs:
            break
        time.sleep(0.25)
    submitter.join(30)
    receipts = sink.snapshot()
    per_notification: list[float] = []
    per_job: dict[str, list[float]] = {}
    wrong = 0
    for receipt in receipts:
        event = json.loads(receipt.body)
        job_id = event["data"]["id"]
        if event["type"] != event_type or job_id not in sent_at:
            wrong += 1
            continue
        latency = (receipt.at - sent_at[job_id]) * 1000
        per_notification.append(latency)
        per_job.setdefault(job_id, []).append(latency)
    complete = [max(values) for values in per_job.values() if len(values) == subs]
    summary = distribution(per_notification)
    row: dict[str, Any] = {
        "subscriptions": subs,
        "path": path,
        "event": event_type,
        "jobs": jobs,
        "callbacks_seen": len(sent_at),
        "notifications_expected": expected,
        "notifications_received": len(per_notification),
        "unexpected_notifications": wrong,
        "latency_ms": summary,
        "last_of_job_ms": distribution(complete),
        "upstream_requests": {
            "submits": stats.get("submits"),
            "fetches": stats.get("fetches"),
            "per_job": round(((stats.get("submits") or 0) + (stats.get("fetches") or 0)) / jobs, 2),
        },
        "cdf_ms": [round(percentile(per_notification, q / 2), 2) for q in range(201)]
        if per_notification
        else [],
    }
    log.info(
        "notify %s x%d: %d/%d notifications, p50 %.1f ms p99 %.1f ms",
        path,
        subs,
        len(per_notification),
        expected,
        summary.get("p50", math.nan),
        summary.get("p99", math.nan),
    )
    return row


def polling_client() -> dict[str, Any]:
    """What a client polling ModelsLab's fetch endpoint every 60 s gets (arithmetic)."""
    return {
        "poll_interval_s": POLL_INTERVAL,
        "detection_delay_ms": {
            "mean": POLL_INTERVAL / 2 * 1000,
            "p50": POLL_INTERVAL / 2 * 1000,
            "p99": POLL_INTERVAL * 0.99 * 1000,
            "max": POLL_INTERVAL * 1000,
        },
        "upstream_requests_per_job": {
            f"{seconds} s generation": 1 + math.ceil(seconds / POLL_INTERVAL)
            for seconds in GENERATION_TIMES
        },
        "note": (
            "The result lands uniformly within a poll interval, so the delay is uniform on "
            "[0, 60 s): mean 30 s. Each job costs 1 submit + ceil(T / 60 s) fetches for a "
            "generation time T (ModelsLab's examples: 45 s, eta 960 s)."
        ),
    }


def run(scale: Scale) -> dict[str, Any]:
    jobs = scale.count(300, 20)
    rows = []
    with stack(NAME, simulator=True) as running:
        running.start_simulator("--delay", str(SIM_DELAY), "--eta", "1")
        running.start_web()
        running.start_worker()
        sink = Sink()
        api = running.api()
        try:
            made = 0
            for subs in SUBSCRIPTIONS:
                while made < subs:
                    subscribe(api, running, sink, made)
                    made += 1
                # Warm up (connections, prepared statements), unmeasured.
                measure(running, api, sink, subs, "failed", max(5, jobs // 5))
                for path in PATHS:
                    rows.append(measure(running, api, sink, subs, path, jobs))
        finally:
            sink.close()
    fast = [row for row in rows if row["path"] == "failed"]
    data = {
        "description": (
            "Simulator callback sent -> signed webhook received by a local sink. "
            f"{jobs} jobs per row, submitted at {RATE:.0f}/s through POST /v1/jobs; "
            "job.failed is written with the callback (motionhook's own latency), "
            "job.completed waits for the worker to download and store the video."
        ),
        "config": {"jobs_per_row": jobs, "submit_rate_per_s": RATE, "simulator_delay_s": SIM_DELAY},
        "rows": rows,
        "polling_client": polling_client(),
        "targets": {
            f"p50 <= 30 ms ({row['subscriptions']} sub)": row["latency_ms"]["p50"] <= TARGET_P50_MS
            for row in fast
        }
        | {
            f"p99 <= 150 ms ({row['subscriptions']} sub)": row["latency_ms"]["p99"] <= TARGET_P99_MS
            for row in fast
        }
        | {
            "every notification arrived": all(
                row["notifications_received"] == row["notifications_expected"] for row in rows
            )
        },
    }
    write_result(NAME, data)
    chart(data)
    return data


def chart(data: dict[str, Any]) -> None:
    fig, ax = figure(1, width=8.0, height=4.0)
    styles = {
        ("failed", 1): (MOTIONHOOK, "-"),
        ("failed", 10): (MOTIONHOOK, "--"),
        ("completed", 1): (ACCENT, "-"),
        ("completed", 10): (ACCENT, "--"),
    }
    for row in data["rows"]:
        samples = row["cdf_ms"]
        if not samples:
            continue
        color, style = styles[(row["path"], row["subscriptions"])]
        ys = [index / (len(samples) - 1) for index in range(len(samples))]
        label = (
            f"{row['event']}, {row['subscriptions']} sub (p50 {row['latency_ms']['p50']:.0f} ms)"
        )
        ax.plot(samples, ys, style, color=color, label=label, linewidth=1.5)
    poll = data["polling_client"]["poll_interval_s"] * 1000
    xs = [poll * step / 100 for step in range(1, 101)]
    ax.plot(xs, [x / poll for x in xs], color=CEILING, linewidth=2, label="polling every 60 s")
    ax.set_xscale("log")
    ax.set_xlabel("callback sent -> notification received (ms, log scale)")
    ax.set_ylabel("fraction of notifications")
    ax.set_title("Notify latency vs polling", fontsize=10)
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    save(fig, NAME)
