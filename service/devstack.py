"""Start web, worker and the simulator as real processes on loopback.

Used by ``motionhook dev`` (``make run``), ``motionhook demo``, the end-to-end
tests and the benchmarks, so they all exercise the processes users deploy.

The processes never outlive whoever started them: on Linux each child asks the
kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), even by SIGKILL,
so no orphaned simulator keeps holding its port. A process counts as started
only once it answers *and* the listening socket on its port is its own: another
program answering on that port cannot pass for it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
GUNICORN_CONF = ROOT / "deploy" / "gunicorn.conf.py"
SAMPLE_IMAGE = Path(__file__).resolve().parent / "static" / "sample.png"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class PortTaken(RuntimeError):
    """A port a process should listen on is already in use."""

    def __init__(self, name: str, port: int) -> None:
        super().__init__(f"port {port} ({name}) is already in use")
        self.name = name
        self.port = port


class StartError(RuntimeError):
    """A process did not start; ``summary`` says so in one line, the message adds its log."""

    def __init__(self, summary: str, log_tail: str = "") -> None:
        super().__init__(f"{summary}\n{log_tail}" if log_tail else summary)
        self.summary = summary


def check_ports_free(ports: Mapping[str, int], host: str = "127.0.0.1") -> None:
    """Raise :class:`PortTaken` for the first of ``ports`` (name: port) that is in use."""
    for name, port in ports.items():
        with socket.socket() as sock:
            # As the servers bind: a port left in TIME_WAIT by a stopped server is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortTaken(name, port) from None
                raise


def listens_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` (or one of its children) holds a listening socket on ``port``."""
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.Error:
        return False
    for process in family:
        try:
            connections = process.net_connections(kind="tcp")
        except psutil.Error:
            continue
        for connection in connections:
            if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
                return True
    return False


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux for SIGTERM when the parent dies (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    parent = os.getpid()

    def set_death_signal() -> None:
        # Runs in the child between fork and exec: nothing here may take a lock.
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return set_death_signal


def wait_until(
    predicate: Callable[[], object],
    *,
    timeout: float,
    interval: float = 0.05,
    message: str = "condition",
) -> object:
    """Poll ``predicate`` until it returns something truthy or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {message}")
        time.sleep(interval)


def answers(url: str) -> bool:
    """Whether ``url`` answers 200 right now."""
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signum)

    def stop(self, timeout: float = 15) -> int | None:
        self.signal(signal.SIGTERM)
        return self.reap(timeout)

    def reap(self, timeout: float) -> int | None:
        """Wait ``timeout`` seconds for the process to exit, then kill it."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.popen.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Stack:
    """A set of motionhook processes sharing one instance folder and one database."""

    instance: Path
    env: dict[str, str] = field(default_factory=dict)
    web_port: int = field(default_factory=free_port)
    sim_port: int = field(default_factory=free_port)
    processes: list[Process] = field(default_factory=list)
    token: str = "test-token"
    simulator: bool = True

    def __post_init__(self) -> None:
        self.instance.mkdir(parents=True, exist_ok=True)
        base = {k: v for k, v in os.environ.items() if not k.startswith("MOTIONHOOK_")}
        base.update(
            {
                "MOTIONHOOK_INSTANCE_PATH": str(self.instance),
                "MOTIONHOOK_PUBLIC_URL": self.web_url,
                "MOTIONHOOK_API_TOKENS": self.token,
                "MOTIONHOOK_ALLOW_PRIVATE_TARGETS": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.simulator:
            base["MOTIONHOOK_MODELSLAB_BASE_URL"] = f"{self.sim_url}/api/v6"
        base.update(self.env)
        self.env = base

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def sim_url(self) -> str:
        return f"http://127.0.0.1:{self.sim_port}"

    def spawn(
        self, name: str, argv: list[str], extra_env: Mapping[str, str] | None = None
    ) -> Process:
        log_path = self.instance / f"{name}-{len(self.processes)}.log"
        handle: IO[bytes] = log_path.open("wb")
        # The death signal belongs to the thread that forks: start stacks from the
        # main thread (or one that outlives them).
        popen = subprocess.Popen(
            argv,
            env={**self.env, **(extra_env or {})},
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
            cwd=str(ROOT),
        )
        handle.close()
        process = Process(name, popen, log_path)
        self.processes.append(process)
        return process

    def migrate(self) -> None:
        subprocess.run(
            [sys.executable, "-m", "service.cli", "db", "upgrade"],
            env=self.env,
            check=True,
            capture_output=True,
            cwd=str(ROOT),
        )

    def start_web(self, extra_env: Mapping[str, str] | None = None) -> Process:
        argv = [
            sys.executable,
            "-m",
            "gunicorn",
            "service:create_app()",
            "-b",
            f"127.0.0.1:{self.web_port}",
        ]
        if GUNICORN_CONF.exists():
            argv += ["-c", str(GUNICORN_CONF)]
        # Counters in the instance folder: a stack that is killed leaves nothing in /tmp.
        env = dict(extra_env or {})
        if "PROMETHEUS_MULTIPROC_DIR" not in self.env and "PROMETHEUS_MULTIPROC_DIR" not in env:
            metrics = self.instance / f"metrics-{len(self.processes)}"
            metrics.mkdir(exist_ok=True)
            env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
        process = self.spawn("web", argv, env)
        self._wait_ready(process, f"{self.web_url}/readyz", self.web_port)
        return process

    def spawn_serve(self, extra_env: Mapping[str, str] | None = None) -> Process:
        """Spawn ``motionhook serve`` (web and worker in one process) without waiting."""
        argv = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1"]
        return self.spawn("serve", [*argv, "--port", str(self.web_port)], extra_env)

    def start_serve(self, extra_env: Mapping[str, str] | None = None) -> Process:
        """``motionhook serve``, started once /readyz says so."""
        process = self.spawn_serve(extra_env)
        self._wait_ready(process, f"{self.web_url}/readyz", self.web_port)
        return process

    def start_worker(self, extra_env: Mapping[str, str] | None = None) -> Process:
        return self.spawn("worker", [sys.executable, "-m", "service.cli", "worker"], extra_env)

    def start_simulator(self, *flags: str) -> Process:
        argv = [
            sys.executable,
            "-m",
            "service.cli",
            "simulate",
            "--port",
            str(self.sim_port),
            *flags,
        ]
        process = self.spawn("simulator", argv)
        self._wait_ready(process, f"{self.sim_url}/_sim/knobs", self.sim_port)
        return process

    def _wait_ready(self, process: Process, url: str, port: int, timeout: float = 30) -> None:
        """Wait until ``process`` itself listens on ``port`` and ``url`` answers 200."""

        def ready() -> bool:
            if process.popen.poll() is not None:
                raise StartError(
                    f"{process.name} exited while starting; see {process.log_path}",
                    process.log()[-4000:],
                )
            return listens_on(process.popen.pid, port) and answers(url)

        try:
            wait_until(ready, timeout=timeout, message=f"{process.name} at {url}")
        except TimeoutError:
            raise StartError(
                f"{process.name} did not answer at {url} within {timeout:.0f} s; "
                f"see {process.log_path}",
                process.log()[-4000:],
            ) from None

    def start_all(self, *simulator_flags: str) -> None:
        self.migrate()
        if self.simulator:
            self.start_simulator(*simulator_flags)
        self.start_web()
        self.start_worker()

    def stop(self, timeout: float = 15) -> None:
        """Stop every process gracefully (SIGTERM), all at once; kill what outlasts ``timeout``."""
        running = [process for process in reversed(self.processes) if process.popen.poll() is None]
        for process in running:
            process.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in running:
            process.reap(max(0.0, deadline - time.monotonic()))

    def kill(self) -> None:
        """End every process now (SIGKILL): for a test that is over, where nothing is left
        to finish and a graceful stop only costs time (gunicorn waits out keep-alives)."""
        for process in self.processes:
            process.signal(signal.SIGKILL)
        for process in self.processes:
            process.popen.wait(5)

    def api(self) -> requests.Session:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.token}"
        return session
