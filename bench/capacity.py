"""Capacity: a batch larger than the ModelsLab account's queued-request cap.

N jobs go in at once through ``POST /v1/jobs``; the simulator enforces a cap of 5
queued requests with 2 s generations and answers 429 with ``retry_after`` 30 s,
as ModelsLab does. Measured: makespan (first POST to last ``completed``) against
the ideal ceil(N / slots) × generation time, upstream submit calls, 429s, and
the queue wait of each job (creation to its accepted submit), for:

- ``cap off``: ``MOTIONHOOK_MODELSLAB_MAX_QUEUED=0``, every job submitted as soon
  as it is queued and each 429 retried on its own (how motionhook behaved before
  the cap existed);
- ``cap 5``: motionhook is the account's only client;
- ``cap 5, shared``: another program holds 2 of the 5 slots.
"""

from __future__ import annotations

import math
import time
from typing import Any

from bench.common import Scale, database_url, log, percentile, stack, wait_for, write_result
from bench.notify import job_body
from service.devstack import Stack

NAME = "capacity"
CAP = 5
GENERATION_S = 2.0
RETRY_AFTER_S = 30
TARGET_RATIO = 1.15
SCENARIOS = (
    ("cap off", 0, 0),
    ("cap 5", CAP, 0),
    ("cap 5, shared", CAP, 2),
)


def _queue_waits(running: Stack) -> list[float]:
    import psycopg

    url = database_url(running).replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT EXTRACT(EPOCH FROM submitted_at - created_at) FROM jobs "
            "WHERE submitted_at IS NOT NULL"
        ).fetchall()
    return [float(row[0]) for row in rows]


def measure(label: str, max_queued: int, held: int, jobs: int) -> dict[str, Any]:
    with stack(NAME, MOTIONHOOK_MODELSLAB_MAX_QUEUED=str(max_queued)) as running:
        running.start_simulator(
            "--delay",
            str(GENERATION_S),
            "--eta",
            "2",
            "--max-queued",
            str(CAP),
            "--held-slots",
            str(held),
            "--rate-limit-retry-after",
            str(RETRY_AFTER_S),
        )
        running.start_web()
        running.start_worker()
        api = running.api()
        began = time.monotonic()
        ids = []
        for _ in range(jobs):
            response = api.post(f"{running.web_url}/v1/jobs", json=job_body(running.sim_url))
            response.raise_for_status()
            ids.append(response.json()["id"])

        def finished() -> bool:
            listed = api.get(f"{running.web_url}/v1/jobs", params={"limit": 100}).json()
            return sum(job["status"] in ("completed", "failed") for job in listed["items"]) == jobs

        wait_for(finished, timeout=1800, interval=0.2, what=f"{label}: {jobs} jobs")
        makespan = time.monotonic() - began
        stats = api.get(f"{running.sim_url}/_sim/stats").json()
        waits = _queue_waits(running)
    slots = CAP - held
    ideal = math.ceil(jobs / slots) * GENERATION_S
    statuses = stats["http_statuses"]["submit"]
    row = {
        "scenario": label,
        "max_queued": max_queued,
        "held_slots": held,
        "jobs": jobs,
        "makespan_s": round(makespan, 2),
        "ideal_s": ideal,
        "ratio": round(makespan / ideal, 3),
        "submit_calls": stats["submits"],
        "rate_limited": int(statuses.get("429", 0)),
        "max_outstanding": stats["max_outstanding"],
        "queue_wait_p50_s": round(percentile(waits, 50), 2),
        "queue_wait_p99_s": round(percentile(waits, 99), 2),
    }
    log.info("%s", row)
    return row


def run(scale: Scale) -> dict[str, Any]:
    jobs = scale.count(50, 10)
    rows = [measure(label, cap, held, jobs) for label, cap, held in SCENARIOS]
    only, shared = rows[1], rows[2]
    windows = math.ceil(shared["makespan_s"] / RETRY_AFTER_S)
    data = {
        "description": (
            f"{jobs} jobs at once against the simulator with a cap of {CAP} queued requests, "
            f"{GENERATION_S:.0f} s generations and retry_after {RETRY_AFTER_S} s."
        ),
        "config": {
            "jobs": jobs,
            "cap": CAP,
            "generation_s": GENERATION_S,
            "retry_after_s": RETRY_AFTER_S,
        },
        "rows": rows,
        "targets": {
            "makespan <= 1.15 x ideal (only client)": only["ratio"] <= TARGET_RATIO,
            "submit calls = N (only client)": only["submit_calls"] == jobs,
            "zero 429s (only client)": only["rate_limited"] == 0,
            "<= one 429 per retry_after window (shared)": shared["rate_limited"] <= windows,
        },
    }
    write_result(NAME, data)
    return data
