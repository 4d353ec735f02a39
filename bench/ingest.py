"""Callback ingest: callbacks per second and latency at ``POST /v1/callbacks/modelslab/…``.

Jobs are inserted as ModelsLab leaves them after a submit (``processing``, with a
reconcile task), then wrk (or the Python generator) POSTs each job one signed
``success`` callback, the body the simulator would send. In the same run and on
the same gunicorn config, the same requests go to the two apps of
``bench/ceiling.py``: a bare Flask app that only parses the JSON, and one that
also commits the callback's transaction in plain psycopg (its own jobs, since it
changes them). Every acknowledged callback is then looked
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

from bench.charts import CEILING, MOTIONHOOK, SQL_CEILING, figure, save, target_line
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
from bench.loadgen import Call, LoadResult, have_wrk, run_load, run_paced
from service.callbacks import callback_token
from service.db import Database
from service.devstack import GUNICORN_CONF, Process, Stack, free_port
from service.models import CallbackRecord, Job, Task, new_id, utcnow

NAME = "ingest"
LEVELS = (1, 4, 8, 16)
HEADLINE = 8
PACED = (0.5, 0.8)
SECONDS = 10.0
WARMUP_SECONDS = 3.0
TARGET_RATIO = 0.5
TARGET_P99_MS = 25.0
LABELS = {"motionhook": "motionhook", "sql": "same SQL", "ceiling": "bare Flask"}


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
        "fetch_result, source_urls, outputs, created_at, updated_at, "
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


def start_ceiling(running: Stack, factory: str = "create_app") -> tuple[Process, str]:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        f"bench.ceiling:{factory}()",
        "-b",
        f"127.0.0.1:{port}",
        "-c",
        str(GUNICORN_CONF),
    ]
    process = running.spawn("ceiling", argv)
    url = f"http://127.0.0.1:{port}"
    running._wait_ready(process, f"{url}/readyz", port)
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
    slices = len(levels) + 1 + len(PACED)
    with stack(NAME, simulator=False) as running:
        url = database_url(running)
        log.info("ingest: inserting %d processing jobs", 2 * per_level * slices)
        jobs = insert_processing_jobs(url, per_level * slices)
        calls = [success_callback(job_id, upstream_id) for job_id, upstream_id in jobs]
        # The plain-SQL ceiling changes its jobs too: it gets jobs of its own.
        sql_calls = [
            success_callback(job_id, upstream_id)
            for job_id, upstream_id in insert_processing_jobs(url, per_level * slices)
        ]
        web = running.start_web()
        ceiling, ceiling_url = start_ceiling(running)
        sql_ceiling, sql_url = start_ceiling(running, "create_sql_app")
        apps = {
            "motionhook": (running.web_url, web.popen.pid),
            "ceiling": (ceiling_url, ceiling.popen.pid),
            "sql": (sql_url, sql_ceiling.popen.pid),
        }
        log.info("ingest: warming up the three apps for %.0f s each", warmup)
        for name, (base_url, _pid) in apps.items():
            warm = (sql_calls if name == "sql" else calls)[:per_level]
            run_load(base_url, warm, connections=HEADLINE, seconds=warmup)
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in apps}
        paced: dict[str, list[dict[str, Any]]] = {name: [] for name in apps}
        slice_number = 1

        def measure(name: str, load: Any) -> dict[str, Any]:
            base_url, pid = apps[name]
            first = slice_number * per_level
            mine = (sql_calls if name == "sql" else calls)[first : first + per_level]
            with cpu_meter(pid) as cpu:
                result: LoadResult = load(base_url, mine)
            row = {**result.as_dict(), **cpu.per(result.answered), "wrapped": result.wrapped}
            if name == "motionhook":
                row.update(verify(url, jobs[first : first + per_level], result))
            return row

        for connections in levels:
            for name in apps:
                rows[name].append(
                    measure(
                        name,
                        lambda base, mine, c=connections: run_load(
                            base, mine, connections=c, seconds=seconds
                        ),
                    )
                )
            slice_number += 1
            _log_row(f"c={connections}", rows)
        best = max(row["throughput_rps"] for row in rows["motionhook"])
        for fraction in PACED:
            rate = max(1.0, best * fraction)
            for name in apps:
                row = measure(
                    name,
                    lambda base, mine, r=rate: run_paced(base, mine, rate=r, seconds=seconds),
                )
                paced[name].append({"fraction_of_max": fraction, "rate": round(rate, 1), **row})
            slice_number += 1
            _log_row(f"{rate:.0f}/s", paced)
    data = summarize(rows, paced, seconds, levels)
    write_result(NAME, data)
    chart(data)
    return data


def _log_row(label: str, rows: dict[str, list[dict[str, Any]]]) -> None:
    ours = rows["motionhook"][-1]
    others = " | ".join(
        f"{LABELS[name]} {row['throughput_rps']:.0f}/s p50 {row['latency_ms']['p50']:.1f}"
        f" p99 {row['latency_ms']['p99']:.1f} ms"
        for name, row in ((name, rows[name][-1]) for name in ("sql", "ceiling"))
    )
    log.info(
        "ingest %s: motionhook %.0f/s p50 %.1f p99 %.1f ms lost %s | %s",
        label,
        ours["throughput_rps"],
        ours["latency_ms"]["p50"],
        ours["latency_ms"]["p99"],
        ours.get("lost"),
        others,
    )


def summarize(
    rows: dict[str, list[dict[str, Any]]],
    paced: dict[str, list[dict[str, Any]]],
    seconds: float,
    levels: tuple[int, ...],
) -> dict[str, Any]:
    ours_best = max(rows["motionhook"], key=lambda row: row["throughput_rps"])
    theirs_best = max(rows["ceiling"], key=lambda row: row["throughput_rps"])
    sql_best = max(rows["sql"], key=lambda row: row["throughput_rps"])
    ratio = ours_best["throughput_rps"] / theirs_best["throughput_rps"]
    sustained = paced["motionhook"][0]
    every = rows["motionhook"] + paced["motionhook"]
    lost = sum(row["lost"] + row["not_applied"] for row in every)
    errors = sum(row["non_2xx"] + row["socket_errors"] for row in every)
    return {
        "description": (
            "Signed ModelsLab success callbacks for processing jobs. Throughput: closed loop, "
            "one keep-alive connection per load thread, best of 1-16 connections. Latency: "
            "open loop at a fixed rate (50% and 80% of motionhook's best), measured from when "
            "each request was due. motionhook, a bare Flask app and a bare Flask app that "
            "commits the same transaction in plain psycopg (bench/ceiling.py), on the same "
            "gunicorn config, in the same run."
        ),
        "config": {
            "gunicorn": gunicorn_settings(),
            "connections": list(levels),
            "seconds_per_run": seconds,
            "load_generator": "wrk" if have_wrk() else "python",
            "database": "postgresql",
            "gunicorn_config": str(GUNICORN_CONF.relative_to(ROOT)),
            "env": {k: v for k, v in os.environ.items() if k.startswith(("WEB_", "GUNICORN_"))},
        },
        "motionhook": rows["motionhook"],
        "ceiling": rows["ceiling"],
        "sql": rows["sql"],
        "paced": paced,
        "headline": {
            "motionhook_rps": ours_best["throughput_rps"],
            "motionhook_best_connections": ours_best["connections"],
            "ceiling_rps": theirs_best["throughput_rps"],
            "ceiling_best_connections": theirs_best["connections"],
            "ratio": round(ratio, 3),
            "sustained_rate": sustained["rate"],
            "p50_ms": sustained["latency_ms"]["p50"],
            "p99_ms": sustained["latency_ms"]["p99"],
            "ceiling_p50_ms": paced["ceiling"][0]["latency_ms"]["p50"],
            "ceiling_p99_ms": paced["ceiling"][0]["latency_ms"]["p99"],
            "web_cpu_ms_per_callback": ours_best["web_cpu_ms_per_request"],
            "postgres_cpu_ms_per_callback": ours_best["postgres_cpu_ms_per_request"],
            "ceiling_cpu_ms_per_request": theirs_best["web_cpu_ms_per_request"],
            "sql_rps": sql_best["throughput_rps"],
            "sql_best_connections": sql_best["connections"],
            "ratio_to_sql": round(ours_best["throughput_rps"] / sql_best["throughput_rps"], 3),
            "sql_web_cpu_ms_per_request": sql_best["web_cpu_ms_per_request"],
            "sql_postgres_cpu_ms_per_request": sql_best["postgres_cpu_ms_per_request"],
            "sql_p99_ms": paced["sql"][0]["latency_ms"]["p99"],
            "lost_callbacks": lost,
            "errors": errors,
        },
        "targets": {
            "throughput >= 50% of ceiling": ratio >= TARGET_RATIO,
            "p99 <= 25 ms (at 50% of max rate)": sustained["latency_ms"]["p99"] <= TARGET_P99_MS,
            "zero lost callbacks": lost == 0 and errors == 0,
        },
    }


SERIES = (("motionhook", MOTIONHOOK), ("sql", SQL_CEILING), ("ceiling", CEILING))


def chart(data: dict[str, Any]) -> None:
    levels = [row["connections"] for row in data["motionhook"]]
    xs = range(len(levels))
    fig, (left, right) = figure(2)
    width = 0.27
    for offset, (name, color) in zip((-1, 0, 1), SERIES, strict=True):
        values = [row["throughput_rps"] for row in data[name]]
        left.bar([x + offset * width for x in xs], values, width, label=LABELS[name], color=color)
    left.set_xticks(list(xs), [str(level) for level in levels])
    left.set_xlabel("concurrent connections (closed loop)")
    left.set_ylabel("callbacks / s")
    left.set_title("Callback ingest throughput", fontsize=10)
    left.legend(fontsize=8, frameon=False)
    labels, p50s, p99s, colors = [], [], [], []
    for name, color in SERIES:
        for row in data["paced"][name]:
            labels.append(f"{LABELS[name]}\n{row['rate']:.0f}/s")
            p50s.append(row["latency_ms"]["p50"])
            p99s.append(row["latency_ms"]["p99"])
            colors.append(color)
    positions = range(len(labels))
    right.bar(positions, p99s, 0.6, color=colors, alpha=0.45, label="p99")
    right.bar(positions, p50s, 0.6, color=colors, label="p50")
    target_line(right, TARGET_P99_MS, "p99 target 25 ms")
    right.set_xticks(list(positions), labels, fontsize=7)
    right.set_ylabel("latency (ms)")
    right.set_title("Latency at a fixed rate (open loop)", fontsize=10)
    right.legend(fontsize=8, frameon=False)
    save(fig, NAME)
