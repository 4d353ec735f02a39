"""The README's Performance table, rebuilt from ``bench/results/*.json``."""

from __future__ import annotations

from typing import Any

from bench import capacity, fanout, footprint, ingest, notify
from bench.common import read_result

YES, NO = "yes", "**no**"


def _met(flag: bool) -> str:
    return YES if flag else NO


def _ingest(data: dict[str, Any]) -> list[str]:
    head = data["headline"]
    rows = [
        f"| Ingest | callbacks/s, best of 1-16 connections | >= 50% of bare Flask | "
        f"{head['motionhook_rps']:.0f}/s vs {head['ceiling_rps']:.0f}/s "
        f"= {head['ratio'] * 100:.0f}% | {_met(head['ratio'] >= ingest.TARGET_RATIO)} |",
        f"| Ingest | p50 / p99 at {head['sustained_rate']:.0f} callbacks/s (50% of best) | "
        f"p99 <= 25 ms | {head['p50_ms']:.1f} / {head['p99_ms']:.1f} ms "
        f"(bare Flask {head['ceiling_p50_ms']:.1f} / {head['ceiling_p99_ms']:.1f}) | "
        f"{_met(head['p99_ms'] <= ingest.TARGET_P99_MS)} |",
    ]
    if "sql_rps" in head:
        rows.append(
            f"| Ingest | callbacks/s vs bare Flask + the same transaction in plain psycopg | "
            f"(none; see below) | {head['motionhook_rps']:.0f}/s vs {head['sql_rps']:.0f}/s "
            f"= {head['ratio_to_sql'] * 100:.0f}% | - |"
        )
    acknowledged = sum(
        row["acknowledged"] for row in data["motionhook"] + data["paced"]["motionhook"]
    )
    lost = head["lost_callbacks"] + head["errors"]
    rows.append(
        f"| Ingest | callbacks lost (acknowledged, not stored and applied) | 0 | "
        f"{lost} of {acknowledged:,} | {_met(lost == 0)} |"
    )
    return rows


def _notify(data: dict[str, Any]) -> list[str]:
    rows = []
    for row in data["rows"]:
        latency = row["latency_ms"]
        target = "p50 <= 30, p99 <= 150 ms" if row["path"] == "failed" else "(no target)"
        met = (
            _met(latency["p50"] <= notify.TARGET_P50_MS and latency["p99"] <= notify.TARGET_P99_MS)
            if row["path"] == "failed"
            else "-"
        )
        what = "job.failed (with the callback)" if row["path"] == "failed" else "job.completed"
        rows.append(
            f"| Notify | {what}, {row['subscriptions']} sub, callback sent -> sink | {target} | "
            f"{latency['p50']:.1f} / {latency['p99']:.1f} ms "
            f"({row['notifications_received']}/{row['notifications_expected']}) | {met} |"
        )
    poll = data["polling_client"]
    per_job = ", ".join(
        f"{count} for {name.split()[0]} s"
        for name, count in poll["upstream_requests_per_job"].items()
    )
    measured = next(row for row in data["rows"] if row["path"] == "completed")
    rows.append(
        f"| Notify | polling every 60 s (ModelsLab SDK), for comparison | - | "
        f"mean {poll['detection_delay_ms']['mean'] / 1000:.0f} s late; "
        f"upstream requests per job: {per_job} "
        f"(motionhook: {measured['upstream_requests']['per_job']:.0f}) | - |"
    )
    return rows


def _fanout(data: dict[str, Any]) -> list[str]:
    one, two = data["rows"]
    return [
        f"| Fan-out | deliveries/s, 1 worker process | >= 1,000/s | "
        f"{one['deliveries_per_s']:.0f}/s ({one['worker_cpu_ms_per_delivery']:.2f} ms CPU each) | "
        f"{_met(one['deliveries_per_s'] >= fanout.TARGET_RATE)} |",
        f"| Fan-out | deliveries/s, 2 worker processes | no duplicates, no losses | "
        f"{two['deliveries_per_s']:.0f}/s (x{data['scaling_ratio']}); {two['duplicates']} "
        f"duplicates, {two['lost']} lost of {two['deliveries']:,} | "
        f"{_met(two['duplicates'] == 0 and two['lost'] == 0)} |",
    ]


def _footprint(data: dict[str, Any]) -> list[str]:
    start = data["cold_start_s"]
    rss = data["rss_mb"]
    jobs = data["jobs"]
    web, worker = rss["web_worker_at_end"], rss["worker_at_end"]
    growth = max(rss["worker_growth_second_half"], rss["web_worker_growth_second_half"])
    return [
        f"| Footprint | cold start of web to first 200 on /readyz (median of "
        f"{len(start['runs'])}) | <= 1 s | {start['median']:.2f} s (max {start['max']:.2f}) | "
        f"{_met(start['median'] <= footprint.TARGET_START_S)} |",
        f"| Footprint | RSS of one gunicorn worker after {jobs:,} jobs | <= 80 MB | "
        f"{web:.1f} MB | {_met(web <= footprint.TARGET_RSS_MIB)} |",
        f"| Footprint | RSS of the worker process after {jobs:,} jobs | <= 80 MB | "
        f"{worker:.1f} MB | {_met(worker <= footprint.TARGET_RSS_MIB)} |",
        f"| Footprint | RSS growth from {jobs // 2:,} to {jobs:,} jobs | none | "
        f"worker {rss['worker_growth_second_half']:+.1f} MB, gunicorn worker "
        f"{rss['web_worker_growth_second_half']:+.1f} MB | "
        f"{_met(growth <= footprint.GROWTH_TOLERANCE_MIB)} |",
    ]


def _capacity(data: dict[str, Any]) -> list[str]:
    rows = []
    for row in data["rows"]:
        only = row["max_queued"] and not row["held_slots"]
        target = "<= 1.15 x ideal, N submits, 0 429s" if only else "-"
        if row["held_slots"]:
            target = "<= one 429 per retry_after window"
        met = "-"
        name = f"Capacity: {data['config']['jobs']} jobs, {row['scenario']}"
        if only:
            met = _met(
                row["ratio"] <= capacity.TARGET_RATIO
                and row["submit_calls"] == row["jobs"]
                and row["rate_limited"] == 0
            )
        elif row["held_slots"]:
            windows = -(-row["makespan_s"] // data["config"]["retry_after_s"])
            met = _met(row["rate_limited"] <= windows)
        rows.append(
            f"| {name} | makespan vs ideal; submits; 429s; queue wait p50/p99 | {target} | "
            f"{row['makespan_s']:.1f} s vs {row['ideal_s']:.0f} s (x{row['ratio']:.2f}); "
            f"{row['submit_calls']} submits; {row['rate_limited']} x 429; "
            f"{row['queue_wait_p50_s']:.1f} / {row['queue_wait_p99_s']:.1f} s | {met} |"
        )
    return rows


def summary() -> str:
    """The results table in Markdown, from whatever results exist."""
    lines = [
        "| Benchmark | Measure | Target | Result | Met |",
        "|---|---|---|---|---|",
    ]
    machine = None
    for name, build in (
        ("ingest", _ingest),
        ("notify", _notify),
        ("fanout", _fanout),
        ("footprint", _footprint),
        ("capacity", _capacity),
    ):
        data = read_result(name)
        if data is None:
            continue
        machine = machine or data.get("machine")
        lines.extend(build(data))
    if machine:
        lines.append("")
        lines.append(
            f"Machine: {machine['cpus']} vCPUs ({machine['cpu_model']}), "
            f"{machine['memory_gib']} GiB RAM, Linux {machine['kernel']}, "
            f"Python {machine['python']}, PostgreSQL {machine['postgresql']}, "
            f"gunicorn {machine['gunicorn']}, load generator {machine['load_generator']}."
        )
    return "\n".join(lines)
