"""``motionhook dev`` (``make run``) for a newcomer: real processes, real ports.

A taken port is named before anything starts; a failed start stops what it had
started and says so in one line; killing ``motionhook dev``, even with SIGKILL,
takes its children with it; and a stranger answering on a child's port cannot
pass for the child.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from service.devstack import ROOT, Stack, StartError, free_port, wait_until

pytestmark = pytest.mark.e2e

DEADLINE = 60.0


def dev_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOTIONHOOK_")}
    env.update(
        {
            "MOTIONHOOK_INSTANCE_PATH": str(tmp_path / "instance"),
            "WEB_CONCURRENCY": "1",
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
    )
    return env


def run_dev(tmp_path: Path, web_port: int, sim_port: int, **env: str) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "dev", "--port", str(web_port)]
        + ["--simulator-port", str(sim_port)],
        env=dev_env(tmp_path, **env),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=DEADLINE,
    )


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def impostor() -> Iterator[int]:
    """Another program answering 200 to every GET, on a port of its own."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("which", ["web", "simulator"])
def test_a_taken_port_is_named_with_the_option_to_pick_another(
    tmp_path: Path, taken_port: int, which: str
) -> None:
    web, sim = (taken_port, free_port()) if which == "web" else (free_port(), taken_port)
    result = run_dev(tmp_path, web, sim)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"port {taken_port} ({which}) is already in use" in lines[0]
    variable = "PORT" if which == "web" else "SIMULATOR_PORT"
    assert f"make run {variable}={taken_port + 1}" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "instance").exists(), "nothing may start before the ports are checked"


def test_a_failed_start_stops_what_it_started_and_says_so_in_one_line(tmp_path: Path) -> None:
    web, sim = free_port(), free_port()
    # gunicorn's config reads WEB_CONCURRENCY: web dies at start, after the simulator is up.
    result = run_dev(tmp_path, web, sim, WEB_CONCURRENCY="many")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "web exited while starting; see" in lines[0]
    assert "Traceback" not in result.stderr
    assert port_free(sim), "the simulator was left running"


def test_killing_dev_with_sigkill_takes_its_children_along(tmp_path: Path) -> None:
    web, sim = free_port(), free_port()
    dev = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "dev", "--port", str(web)]
        + ["--simulator-port", str(sim)],
        env=dev_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    children: list[psutil.Process] = []
    try:
        assert dev.stdout is not None
        for line in dev.stdout:
            if b"motionhook is running" in line:
                break
        else:
            pytest.fail(f"dev exited with {dev.wait()} before it was running")
        children = psutil.Process(dev.pid).children(recursive=True)
        assert len(children) >= 3  # simulator, gunicorn master and worker(s), worker
        assert requests.get(f"http://127.0.0.1:{web}/readyz", timeout=5).status_code == 200
        dev.send_signal(signal.SIGKILL)
        dev.wait(10)

        def all_gone() -> bool:
            return not any(_alive(child) for child in children)

        wait_until(all_gone, timeout=DEADLINE, message="dev's children to exit")
        assert port_free(web) and port_free(sim)
    finally:
        if dev.poll() is None:
            dev.kill()
        for child in children:
            if _alive(child):
                child.kill()


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_an_impostor_on_the_port_does_not_pass_for_the_simulator(
    tmp_path: Path, impostor: int
) -> None:
    stack = Stack(tmp_path / "stack", sim_port=impostor)
    try:
        with pytest.raises(StartError) as raised:
            stack.start_simulator()
        assert "simulator exited while starting" in raised.value.summary
    finally:
        stack.kill()
