"""What every benchmark shares: the database, the process stack, statistics, results."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from service.devstack import Stack, wait_until

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

#: The PostgreSQL server the benchmarks use; each run gets a fresh database on it.
SERVER_URL = os.environ.get(
    "MOTIONHOOK_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
DATABASE = "motionhook_bench"

TOKEN = "bench-token"
CALLBACK_SECRET = "bench-callback-secret"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"motionhook-bench-webhook-secret!").decode()


@dataclass(frozen=True)
class Scale:
    """How big a run is: 1.0 for the published numbers, smaller for a smoke run."""

    factor: float = 1.0

    def count(self, full: int, minimum: int = 1) -> int:
        return max(minimum, int(full * self.factor))

    def seconds(self, full: float, minimum: float = 2.0) -> float:
        return max(minimum, full * self.factor)


def fresh_database(name: str = DATABASE) -> str:
    """Drop and recreate database ``name`` on the benchmark server; return its URL."""
    server = make_url(SERVER_URL)
    admin = server.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return server.set(drivername="postgresql", database=name).render_as_string(hide_password=False)


def drop_database(name: str = DATABASE) -> None:
    server = make_url(SERVER_URL)
    admin = server.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def bench_env(database_url: str, **extra: str) -> dict[str, str]:
    """The environment of every benchmark process (fixed secrets, PostgreSQL, dev mode)."""
    return {
        "MOTIONHOOK_DATABASE_URL": database_url,
        "MOTIONHOOK_CALLBACK_SECRET": CALLBACK_SECRET,
        "MOTIONHOOK_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "MOTIONHOOK_API_TOKENS": TOKEN,
        "MOTIONHOOK_ALLOW_PRIVATE_TARGETS": "1",
        # The per-token API rate limit (600/minute) protects a real deployment; the
        # benchmarks submit thousands of jobs with one token.
        "MOTIONHOOK_RATELIMIT": "1000000/minute",
        **extra,
    }


@contextlib.contextmanager
def stack(
    name: str, *, simulator: bool = True, database: str = DATABASE, **env: str
) -> Iterator[Stack]:
    """A migrated :class:`Stack` on a fresh database, stopped and cleaned up afterwards."""
    url = fresh_database(database)
    instance = Path(tempfile.mkdtemp(prefix=f"motionhook-bench-{name}-"))
    running = Stack(instance, env=bench_env(url, **env), token=TOKEN, simulator=simulator)
    running.migrate()
    try:
        yield running
    finally:
        running.stop()
        keep = os.environ.get("MOTIONHOOK_BENCH_KEEP")
        if keep:
            log.info("kept %s (logs and media)", instance)
        else:
            shutil.rmtree(instance, ignore_errors=True)
        with contextlib.suppress(psycopg.Error):
            drop_database(database)


def database_url(running: Stack) -> str:
    return running.env["MOTIONHOOK_DATABASE_URL"]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def distribution(values_ms: Sequence[float]) -> dict[str, float]:
    """Count, mean and the percentiles we publish, in milliseconds."""
    if not values_ms:
        return {"count": 0}
    return {
        "count": len(values_ms),
        "mean": round(sum(values_ms) / len(values_ms), 2),
        "p50": round(percentile(values_ms, 50), 2),
        "p90": round(percentile(values_ms, 90), 2),
        "p99": round(percentile(values_ms, 99), 2),
        "max": round(max(values_ms), 2),
    }


def write_result(name: str, data: Mapping[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` with the machine it ran on."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    document = {
        "benchmark": name,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "source": _command("git", "-C", str(ROOT), "describe", "--always", "--dirty"),
        "machine": machine(),
        "load_average_at_end": [round(value, 2) for value in os.getloadavg()],
        **data,
    }
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    log.info("wrote %s", path.relative_to(ROOT))
    return path


def read_result(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _command(*argv: str) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine() -> dict[str, Any]:
    """Describe the machine and the versions that produced a result."""
    lscpu = _command("lscpu")
    model = re.search(r"^Model name:\s*(.+)$", lscpu, re.MULTILINE)
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    total = re.search(r"^MemTotal:\s*(\d+) kB", meminfo, re.MULTILINE)
    postgres = ""
    with contextlib.suppress(psycopg.Error):
        url = make_url(SERVER_URL).set(drivername="postgresql")
        with psycopg.connect(url.render_as_string(hide_password=False)) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            postgres = str(row[0]) if row else ""
    from importlib.metadata import version

    return {
        "cpus": os.cpu_count(),
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "memory_gib": round(int(total.group(1)) / 1024 / 1024, 1) if total else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": postgres,
        "gunicorn": version("gunicorn"),
        "load_generator": "wrk " + _wrk_version() if shutil.which("wrk") else "python",
    }


def _wrk_version() -> str:
    # ``wrk -v`` prints its version and usage, and exits 1.
    result = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    found = re.search(r"wrk (\S+)", result.stdout + result.stderr)
    return found.group(1) if found else "?"


def rss_mb(pid: int) -> float:
    """Resident set size of a process (``VmRSS``), in MB of 10^6 bytes like the targets."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^VmRSS:\s*(\d+) kB", status, re.MULTILINE)
    return round(int(found.group(1)) * 1024 / 1e6, 1) if found else math.nan


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (gunicorn's workers, for its master)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command may contain spaces and parentheses: split after the last ")".
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            children.append(int(entry.name))
    return sorted(children)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children (a gunicorn master and its workers)."""
    total = 0.0
    for member in [pid, *child_pids(pid)]:
        with contextlib.suppress(OSError):
            total += process_cpu_seconds(member)
    return total


def postgres_cpu_seconds() -> float:
    """CPU time of every PostgreSQL server process on this machine (0 if none is local)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            if (entry / "comm").read_text().strip() == "postgres":
                total += process_cpu_seconds(int(entry.name))
    return total


def wait_for_quiet(threshold: float = 1.0, patience: float = 300.0) -> float:
    """Wait (a while) for the 1-minute load average to drop below ``threshold``.

    Other work on the machine skews every number here; this does not prevent it,
    but it avoids starting in the middle of it. Returns the load average it began at.
    """
    deadline = time.monotonic() + patience
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        log.info("waiting for a quiet machine (load average %.2f)", os.getloadavg()[0])
        time.sleep(15)
    return round(os.getloadavg()[0], 2)


def wait_for(predicate: Any, *, timeout: float, interval: float = 0.1, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    return wait_until(predicate, timeout=timeout, interval=interval, message=what)


def python() -> str:
    return sys.executable
