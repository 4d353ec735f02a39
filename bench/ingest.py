"""Callback ingest: callbacks per second and latency at ``POST /v1/callbacks/modelslab/…``.

Jobs are inserted as ModelsLab leaves them after a submit (``processing``, with a
reconcile task), then wrk (or the Python generator) POSTs each job one signed
``success`` callback, the body the simulator would send. In the same run and on
the same gunicorn config, the same requests go to ``bench/ceiling.py``, a bare
Flask app that only parses the JSON. Every acknowledged callback is then looked
up in the ``callbacks`` table and its job checked for the state the callback
implies (``upstream_status = success`` and a download task): a missing one is a
lost callback.
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import sys
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
from sqlalchemy import bindparam, func, select

from bench.charts import CEILING, MOTIONHOOK, figure, save, target_line
from bench.common import (
    CALLBACK_SECRET,
    ROOT,
    Scale,
    database_url,
    log,
    postgres_cpu_seconds,
    stack,
    tree_cpu_seconds,
    write_result,
)
from bench.loadgen import Call, LoadResult, have_wrk, run_load
from service.callbacks import callback_token
from service.db import Database
from service.devstack import GUNICORN_CONF, Process, Stack, free_port
from service.models import CallbackRecord, Job, Task, new_id, utcnow

NAME = "ingest"
LEVELS = (1, 4, 8, 16)
HEADLINE = 8
SECONDS = 10.0
WARMUP_SECONDS = 3.0
TARGET_RATIO = 0.5
TARGET_P99_MS = 25.0


def _job_input() -> dict[str, Any]:
    return {
        "init_image": "https://example.com/cat.png",
        "prompt": "the cat turns its head",
        "width": 512,
        "height": 512,
        "num_frames": 16,
        "fps": 8,
    }


def insert_processing_jobs(url: str, count: int) -> list[tuple[str, int]]:
    """Insert ``count`` jobs in the state ModelsLab's submit answer leaves them in.

    COPY, not the ORM: a run needs about 100,000 of them and only their state matters.
    """
    now = utcnow()
    later = now + timedelta(hours=1)
    job_input = json.dumps(_job_input())
    made = [(new_id("job"), 100_000 + number) for number in range(count)]
    job_columns = (
        "id, status, model_id, input, metadata, upstream_id, upstream_status, eta, "
        "fetch_result, source_urls, outputs, submit_attempts, created_at, updated_at, "
        "submitted_at"
    )
    with psycopg.connect(url) as conn, conn.cursor() as cursor:
        with cursor.copy(f"COPY jobs ({job_columns}) FROM STDIN") as copy:
            for job_id, upstream_id in made:
                copy.write_row(
                    (
                        job_id,
                        "processing",
                        "wan2.2",
                        job_input,
                        "{}",
                        str(upstream_id),
                        "processing",
                        30.0,
                        f"https://modelslab.com/api/v6/video/fetch/{upstream_id}",
                        "[]",
                        "[]",
                        1,
                        now,
                        now,
                        now,
                    )
                )
        columns = "kind, job_id, due_at, attempts, created_at"
        with cursor.copy(f"COPY tasks ({columns}) FROM STDIN") as copy:
            for job_id, _upstream_id in made:
                copy.write_row(("reconcile", job_id, later, 0, now))
    return made


def success_callback(job_id: str, upstream_id: int) -> Call:
    """The signed callback ModelsLab (and the simulator) sends when a job succeeds."""
    output = f"https://pub-3626123a908346a7a8be8d9295f44e26.r2.dev/video/{upstream_id}.mp4"
    body = {
        "status": "success",
        "generationTime": 45.2,
        "id": upstream_id,
        "output": [output],
        "proxy_links": [output],
        "meta": {**_job_input(), "model_id": "wan2.2", "seed": 1234, "track_id": job_id},
        "track_id": job_id,
    }
    path = f"/v1/callbacks/modelslab/{job_id}?sig={callback_token(CALLBACK_SECRET, job_id)}"
    return Call(path, json.dumps(body, separators=(",", ":")).encode())


class CpuMeter:
    """CPU used by a gunicorn process tree and by PostgreSQL while a block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.web = self.database = 0.0

    def per(self, requests: int) -> dict[str, float]:
        """CPU milliseconds per request: the web processes, and PostgreSQL (all of it)."""
        count = max(1, requests)
        return {
            "web_cpu_ms_per_request": round(self.web * 1000 / count, 3),
            "postgres_cpu_ms_per_request": round(self.database * 1000 / count, 3),
        }


@contextlib.contextmanager
def cpu_meter(pid: int) -> Iterator[CpuMeter]:
    meter = CpuMeter(pid)
    web, database = tree_cpu_seconds(pid), postgres_cpu_seconds()
    yield meter
    meter.web = tree_cpu_seconds(pid) - web
    meter.database = postgres_cpu_seconds() - database


def gunicorn_settings() -> dict[str, Any]:
    """The worker model the standard config resolves to on this machine."""
    conf = runpy.run_path(str(GUNICORN_CONF))
    return {key: conf[key] for key in ("workers", "threads", "worker_class", "keepalive")}


def start_ceiling(running: Stack) -> tuple[Process, str]:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "bench.ceiling:create_app()",
        "-b",
        f"127.0.0.1:{port}",
        "-c",
        str(GUNICORN_CONF),
    ]
    process = running.spawn("ceiling", argv)
    url = f"http://127.0.0.1:{port}"
    running._wait_ready(process, f"{url}/readyz")
    return process, url


def verify(url: str, jobs: list[tuple[str, int]], result: LoadResult) -> dict[str, Any]:
    """Check every acknowledged callback is stored and was applied to its job."""
    acked = sorted({jobs[index][0] for index in result.acknowledged})
    pending = sorted({jobs[index][0] for index in result.in_flight})
    db = Database(url)
    try:
        with db.transaction() as session:
            stored = _count_by_job(session, acked)
            applied = _applied(session, acked)
            in_flight_stored = len(_count_by_job(session, pending))
    finally:
        db.dispose()
    lost = [job_id for job_id in acked if job_id not in stored]
    return {
        "acknowledged": len(acked),
        "stored": sum(1 for job_id in acked if job_id in stored),
        "lost": len(lost),
        "lost_examples": lost[:5],
        "applied": applied,
        "not_applied": len(acked) - applied,
        "in_flight_at_stop": len(pending),
        "in_flight_stored": in_flight_stored,
    }


def _count_by_job(session: Any, job_ids: list[str]) -> dict[str, int]:
    if not job_ids:
        return {}
    query = (
        select(CallbackRecord.job_id, func.count())
        .where(CallbackRecord.job_id.in_(bindparam("ids", expanding=True)))
        .group_by(CallbackRecord.job_id)
    )
    counts: dict[str, int] = {}
    for start in range(0, len(job_ids), 10_000):
        chunk = job_ids[start : start + 10_000]
        counts.update({row[0]: row[1] for row in session.execute(query, {"ids": chunk})})
    return counts


def _applied(session: Any, job_ids: list[str]) -> int:
    """Jobs whose callback took effect: upstream success recorded and a download queued."""
    query = (
        select(func.count())
        .select_from(Job)
        .join(Task, (Task.job_id == Job.id) & (Task.kind == "download"))
        .where(Job.id.in_(bindparam("ids", expanding=True)), Job.upstream_status == "success")
    )
    total = 0
    for start in range(0, len(job_ids), 10_000):
        total += session.scalar(query, {"ids": job_ids[start : start + 10_000]}) or 0
    return total


def run(scale: Scale) -> dict[str, Any]:
    seconds = scale.seconds(SECONDS)
    warmup = scale.seconds(WARMUP_SECONDS, 1.0)
    per_level = scale.count(20_000, 500)
    levels = LEVELS
    with stack(NAME, simulator=False) as running:
        url = database_url(running)
        total = per_level * (len(levels) + 1)
        log.info("ingest: inserting %d processing jobs", total)
        jobs = insert_processing_jobs(url, total)
        calls = [success_callback(job_id, upstream_id) for job_id, upstream_id in jobs]
        web = running.start_web()
        ceiling, ceiling_url = start_ceiling(running)
        log.info("ingest: warming up both apps for %.0f s each", warmup)
        run_load(running.web_url, calls[:per_level], connections=HEADLINE, seconds=warmup)
        run_load(ceiling_url, calls[:per_level], connections=HEADLINE, seconds=warmup)
        rows: dict[str, list[dict[str, Any]]] = {"motionhook": [], "ceiling": []}
        for number, connections in enumerate(levels, start=1):
            mine = calls[number * per_level : (number + 1) * per_level]
            with cpu_meter(web.popen.pid) as ours_cpu:
                ours = run_load(running.web_url, mine, connections=connections, seconds=seconds)
            check = verify(url, jobs[number * per_level : (number + 1) * per_level], ours)
            rows["motionhook"].append(
                {**ours.as_dict(), **check, "wrapped": ours.wrapped, **ours_cpu.per(ours.answered)}
            )
            with cpu_meter(ceiling.popen.pid) as theirs_cpu:
                theirs = run_load(ceiling_url, mine, connections=connections, seconds=seconds)
            rows["ceiling"].append({**theirs.as_dict(), **theirs_cpu.per(theirs.answered)})
            log.info(
                "ingest c=%d: motionhook %.0f/s p50 %.1f p99 %.1f ms lost %d | "
                "ceiling %.0f/s p50 %.1f p99 %.1f ms",
                connections,
                ours.throughput,
                ours.latency_ms["p50"],
                ours.latency_ms["p99"],
                check["lost"],
                theirs.throughput,
                theirs.latency_ms["p50"],
                theirs.latency_ms["p99"],
            )
    head = levels.index(HEADLINE)
    ours_row, theirs_row = rows["motionhook"][head], rows["ceiling"][head]
    ratio = ours_row["throughput_rps"] / theirs_row["throughput_rps"]
    lost = sum(row["lost"] + row["not_applied"] for row in rows["motionhook"])
    errors = sum(row["non_2xx"] + row["socket_errors"] for row in rows["motionhook"])
    data = {
        "description": (
            "Signed ModelsLab success callbacks for processing jobs, closed loop, one "
            "keep-alive connection per load thread; motionhook and a bare Flask app "
            "(bench/ceiling.py) on the same gunicorn config, same requests, same run."
        ),
        "config": {
            "gunicorn": gunicorn_settings(),
            "connections": list(levels),
            "seconds_per_level": seconds,
            "load_generator": "wrk" if have_wrk() else "python",
            "database": "postgresql",
            "gunicorn_config": str(GUNICORN_CONF.relative_to(ROOT)),
            "env": {k: v for k, v in os.environ.items() if k.startswith(("WEB_", "GUNICORN_"))},
        },
        "motionhook": rows["motionhook"],
        "ceiling": rows["ceiling"],
        "headline": {
            "connections": HEADLINE,
            "motionhook_rps": ours_row["throughput_rps"],
            "ceiling_rps": theirs_row["throughput_rps"],
            "ratio": round(ratio, 3),
            "p50_ms": ours_row["latency_ms"]["p50"],
            "p99_ms": ours_row["latency_ms"]["p99"],
            "ceiling_p50_ms": theirs_row["latency_ms"]["p50"],
            "ceiling_p99_ms": theirs_row["latency_ms"]["p99"],
            "lost_callbacks": lost,
            "errors": errors,
        },
        "targets": {
            "throughput >= 50% of ceiling": ratio >= TARGET_RATIO,
            "p99 <= 25 ms": ours_row["latency_ms"]["p99"] <= TARGET_P99_MS,
            "zero lost callbacks": lost == 0 and errors == 0,
        },
    }
    write_result(NAME, data)
    chart(data)
    return data


def chart(data: dict[str, Any]) -> None:
    levels = [row["connections"] for row in data["motionhook"]]
    xs = range(len(levels))
    fig, (left, right) = figure(2)
    width = 0.38
    ours = [row["throughput_rps"] for row in data["motionhook"]]
    theirs = [row["throughput_rps"] for row in data["ceiling"]]
    left.bar([x - width / 2 for x in xs], ours, width, label="motionhook", color=MOTIONHOOK)
    left.bar([x + width / 2 for x in xs], theirs, width, label="bare Flask", color=CEILING)
    left.set_xticks(list(xs), [str(level) for level in levels])
    left.set_xlabel("concurrent connections")
    left.set_ylabel("callbacks / s")
    left.set_title("Callback ingest throughput", fontsize=10)
    left.legend(fontsize=8, frameon=False)
    for key, style in (("p50", ":"), ("p99", "-")):
        right.plot(
            levels,
            [row["latency_ms"][key] for row in data["motionhook"]],
            style,
            marker="o",
            color=MOTIONHOOK,
            label=f"motionhook {key}",
        )
        right.plot(
            levels,
            [row["latency_ms"][key] for row in data["ceiling"]],
            style,
            marker="s",
            color=CEILING,
            label=f"bare Flask {key}",
        )
    target_line(right, TARGET_P99_MS, "p99 target 25 ms")
    right.set_xscale("log", base=2)
    right.set_xticks(levels, [str(level) for level in levels])
    right.set_xlabel("concurrent connections")
    right.set_ylabel("latency (ms)")
    right.set_title("Callback latency", fontsize=10)
    right.legend(fontsize=7, frameon=False)
    save(fig, NAME)
