"""Footprint: cold start of ``web``, and resident memory while 10,000 jobs go through.

- Cold start: from spawning ``gunicorn 'service:create_app()' -c deploy/gunicorn.conf.py``
  to the first 200 on ``/readyz`` (database reachable, migrations at head), polled
  every 5 ms; five starts, each a fresh process.
- Memory: 10,000 jobs take the whole path (``POST /v1/jobs``, submit to the
  simulator, callback, download and storage of the video, ``job.completed`` to a
  webhook sink). ``VmRSS`` of every gunicorn worker and of the ``motionhook
  worker`` process is sampled every 1,000 completed jobs.
"""

from __future__ import annotations

import http.client
import statistics
import sys
import threading
import time
from typing import Any

import requests

from bench.charts import ACCENT, MOTIONHOOK, figure, save, target_line
from bench.common import Scale, child_pids, log, rss_mb, stack, write_result
from bench.sink import Sink
from service.devstack import GUNICORN_CONF, Stack, free_port

NAME = "footprint"
COLD_STARTS = 5
JOBS = 10_000
SAMPLE_EVERY = 1_000
IN_FLIGHT = 100
SUBMITTERS = 4
TARGET_START_S = 1.0
TARGET_RSS_MIB = 80.0
# Growth between 5,000 and 10,000 jobs we still call "none": allocator noise.
GROWTH_TOLERANCE_MIB = 2.0


def _ready(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/readyz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def cold_start(running: Stack) -> float:
    """Seconds from spawning gunicorn to the first 200 on ``/readyz``."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "service:create_app()",
        "-b",
        f"127.0.0.1:{port}",
        "-c",
        str(GUNICORN_CONF),
    ]
    began = time.monotonic()
    process = running.spawn("coldstart", argv)
    try:
        while not _ready(port):
            if process.popen.poll() is not None:
                raise RuntimeError("web exited:\n" + process.log()[-3000:])
            if time.monotonic() - began > 60:
                raise TimeoutError("web did not become ready in 60 s")
            time.sleep(0.005)
        return time.monotonic() - began
    finally:
        process.stop()
        running.processes.remove(process)


def sample(web_master: int, worker: int, completed: int) -> dict[str, Any]:
    web = [rss_mb(pid) for pid in child_pids(web_master)]
    return {
        "jobs_completed": completed,
        "worker_rss_mb": rss_mb(worker),
        "web_worker_rss_mb": web,
        "web_worker_rss_max_mb": max(web) if web else None,
    }


def run_jobs(running: Stack, sink: Sink, total: int, web_master: int, worker: int) -> list[Any]:
    """Push ``total`` jobs through, at most IN_FLIGHT unfinished; sample RSS as they finish."""
    body = {
        "init_image": f"{running.sim_url}/_sim/sample.png",
        "prompt": "a slow zoom over the hills",
        "width": 64,
        "height": 64,
        "num_frames": 2,
        "fps": 8,
    }
    submitted = [0]
    errors: list[str] = []
    lock = threading.Lock()

    def submitter() -> None:
        api = running.api()
        while True:
            with lock:
                if submitted[0] >= total or errors:
                    return
                if submitted[0] - sink.count() >= IN_FLIGHT:
                    wait = True
                else:
                    submitted[0] += 1
                    wait = False
            if wait:
                time.sleep(0.005)
                continue
            try:
                response = api.post(f"{running.web_url}/v1/jobs", json=body, timeout=30)
                response.raise_for_status()
            except requests.RequestException as exc:
                errors.append(str(exc))

    threads = [threading.Thread(target=submitter, daemon=True) for _ in range(SUBMITTERS)]
    for thread in threads:
        thread.start()
    samples: list[Any] = []
    next_mark = SAMPLE_EVERY
    began = time.monotonic()
    deadline = began + max(600.0, total * 0.2)
    while next_mark <= total:
        if errors:
            raise RuntimeError(f"submitting failed: {errors[0]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sink.count()} of {total} jobs completed before the deadline")
        if sink.count() >= next_mark:
            samples.append(sample(web_master, worker, next_mark))
            log.info(
                "footprint: %d jobs, worker %.1f MB, web workers max %.1f MB (%.0f jobs/s)",
                next_mark,
                samples[-1]["worker_rss_mb"],
                samples[-1]["web_worker_rss_max_mb"],
                next_mark / (time.monotonic() - began),
            )
            next_mark += SAMPLE_EVERY
        time.sleep(0.05)
    for thread in threads:
        thread.join(10)
    return samples


def run(scale: Scale) -> dict[str, Any]:
    total = scale.count(JOBS, SAMPLE_EVERY * 2)
    with stack(NAME, simulator=True) as running:
        starts = [round(cold_start(running), 3) for _ in range(COLD_STARTS)]
        log.info("footprint: cold starts %s s", starts)
        running.start_simulator("--delay", "0.1", "--eta", "1")
        web = running.start_web()
        worker = running.start_worker()
        sink = Sink(keep_bodies=False)
        try:
            api = running.api()
            api.post(
                f"{running.web_url}/v1/subscriptions",
                json={"kind": "webhook", "url": sink.url("done"), "events": ["job.completed"]},
                timeout=10,
            ).raise_for_status()
            samples = run_jobs(running, sink, total, web.popen.pid, worker.popen.pid)
            stats = requests.get(f"{running.sim_url}/_sim/stats", timeout=10).json()
        finally:
            sink.close()
    half = next(item for item in samples if item["jobs_completed"] == total // 2)
    last = samples[-1]
    worker_growth = last["worker_rss_mb"] - half["worker_rss_mb"]
    web_growth = last["web_worker_rss_max_mb"] - half["web_worker_rss_max_mb"]
    data = {
        "description": (
            "Cold start: spawn of gunicorn (standard config) to the first 200 on /readyz. "
            f"Memory: VmRSS while {total} jobs run the whole path on PostgreSQL "
            "(simulator, callbacks, stored videos, job.completed webhooks)."
        ),
        "cold_start_s": {
            "runs": starts,
            "median": round(statistics.median(starts), 3),
            "max": max(starts),
        },
        "jobs": total,
        "samples": samples,
        "rss_mb": {
            "worker_at_half": half["worker_rss_mb"],
            "worker_at_end": last["worker_rss_mb"],
            "worker_growth_second_half": round(worker_growth, 1),
            "web_worker_at_half": half["web_worker_rss_max_mb"],
            "web_worker_at_end": last["web_worker_rss_max_mb"],
            "web_worker_growth_second_half": round(web_growth, 1),
        },
        "simulator": {key: stats.get(key) for key in ("submits", "fetches", "callbacks_sent")},
        "targets": {
            "cold start <= 1 s": statistics.median(starts) <= TARGET_START_S,
            "gunicorn worker <= 80 MB": last["web_worker_rss_max_mb"] <= TARGET_RSS_MIB,
            "worker process <= 80 MB": last["worker_rss_mb"] <= TARGET_RSS_MIB,
            "no growth 5,000 -> 10,000 jobs": max(worker_growth, web_growth)
            <= GROWTH_TOLERANCE_MIB,
        },
    }
    write_result(NAME, data)
    chart(data)
    return data


def chart(data: dict[str, Any]) -> None:
    fig, (left, right) = figure(2)
    starts = data["cold_start_s"]["runs"]
    left.bar(range(1, len(starts) + 1), starts, color=MOTIONHOOK, width=0.6)
    target_line(left, TARGET_START_S, "target 1 s")
    left.set_xlabel("start #")
    left.set_ylabel("seconds to first 200 on /readyz")
    left.set_title(
        f"Cold start of web (median {data['cold_start_s']['median']:.2f} s)", fontsize=10
    )
    # A sample at 0 jobs would catch the worker still importing: start at the first 1,000.
    samples = [item for item in data["samples"] if item["jobs_completed"] > 0]
    xs = [item["jobs_completed"] for item in samples]
    right.plot(
        xs,
        [item["worker_rss_mb"] for item in samples],
        marker="o",
        color=ACCENT,
        label="motionhook worker",
    )
    right.plot(
        xs,
        [item["web_worker_rss_max_mb"] for item in samples],
        marker="s",
        color=MOTIONHOOK,
        label="gunicorn worker (largest)",
    )
    target_line(right, TARGET_RSS_MIB, "target 80 MB")
    right.set_ylim(0, max(TARGET_RSS_MIB * 1.25, *[item["worker_rss_mb"] for item in samples]))
    right.set_xlabel("jobs completed")
    right.set_ylabel("resident memory (MB)")
    right.set_title("Resident memory", fontsize=10)
    right.legend(fontsize=8, frameon=False, loc="lower right")
    save(fig, NAME)
