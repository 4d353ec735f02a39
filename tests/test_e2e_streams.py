"""Live event streams over real sockets: gunicorn workers, processes, reconnects, the bound."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import sseclient

from service.devstack import SAMPLE_IMAGE, Stack
from tests.conftest import eventually

pytestmark = pytest.mark.e2e


class StreamsBusy(Exception):
    """The web process answered 503: all its stream slots are taken."""


class Listener:
    """Reads one SSE stream in a thread, keeping every event (and comment lines)."""

    def __init__(self, session: requests.Session, url: str, **headers: str) -> None:
        self.response = session.get(url, stream=True, headers=headers, timeout=(5, 60))
        if self.response.status_code == 503:
            raise StreamsBusy(self.response.text)
        assert self.response.status_code == 200, self.response.text
        self.events: list[sseclient.Event] = []
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in sseclient.SSEClient(self.response).events():
                self.events.append(event)
        except (requests.RequestException, AttributeError, ValueError):
            pass  # closed by the test
        finally:
            self.ended.set()

    @property
    def ids(self) -> list[str]:
        return [event.id for event in self.events]

    def close(self) -> None:
        # Shut the socket first: it wakes the reading thread, which close() would wait for.
        with contextlib.suppress(OSError):
            self._socket().shutdown(socket.SHUT_RDWR)
        self.response.close()
        self.ended.wait(10)

    def _socket(self) -> socket.socket:
        sock: socket.socket = self.response.raw._fp.fp.raw._sock  # this stream's connection
        return sock

    def client_port(self) -> int:
        port: int = self._socket().getsockname()[1]
        return port


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def serving_pid(stack_web_pid: int, web_port: int, client_port: int) -> int | None:
    """Which gunicorn worker holds the server side of the connection from ``client_port``."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == web_port and int(remote.split(":")[1], 16) == (
            client_port
        ):
            inode = fields[9]
    if inode is None:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == stack_web_pid and inode in _socket_inodes(int(entry.name)):
                return int(entry.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


@pytest.fixture
def stack(make_stack: Callable[..., Stack]) -> Iterator[Stack]:
    stack = make_stack(MOTIONHOOK_STREAM_HEARTBEAT="1")
    stack.start_all()
    yield stack


def ping(stack: Stack, api: requests.Session, subscription_id: str, count: int) -> list[str]:
    url = f"{stack.web_url}/v1/subscriptions/{subscription_id}/test"
    return [api.post(url, timeout=10).json()["event_id"] for _ in range(count)]


def subscription(stack: Stack, api: requests.Session) -> str:
    body = {"kind": "webhook", "url": f"{stack.web_url}/healthz", "events": ["job.completed"]}
    response = api.post(f"{stack.web_url}/v1/subscriptions", json=body, timeout=10)
    assert response.status_code == 201, response.text
    sub_id: str = response.json()["id"]
    return sub_id


def submit(stack: Stack, api: requests.Session, **form: Any) -> str:
    with SAMPLE_IMAGE.open("rb") as image:
        response = api.post(
            f"{stack.web_url}/v1/jobs",
            files={"image": image},
            data={"prompt": "zoom", **form},
            timeout=10,
        )
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def test_clients_on_different_gunicorn_workers_receive_the_same_events_in_order(
    make_stack: Callable[..., Stack],
) -> None:
    # Each gevent worker takes one connection at a time (GUNICORN_WORKER_CONNECTIONS=1)
    # and stops accepting while it holds one: the second stream must land on another
    # worker than the first, whichever the kernel would pick. Four workers leave two for
    # the API and the simulator's callbacks.
    stack = make_stack(MOTIONHOOK_STREAM_HEARTBEAT="1")
    stack.migrate()
    stack.start_simulator()
    web = stack.start_web({"WEB_CONCURRENCY": "4", "GUNICORN_WORKER_CONNECTIONS": "1"})
    stack.start_worker()
    api = stack.api()
    url = f"{stack.web_url}/v1/events/stream"
    listeners: dict[int, Listener] = {}
    for _ in range(2):
        listener = Listener(api, url)
        pid = eventually(
            stack,
            lambda listener=listener: serving_pid(
                web.popen.pid, stack.web_port, listener.client_port()
            ),
            "the serving worker",
        )
        listeners[pid] = listener
    assert len(listeners) == 2, "both streams landed on one worker"
    job_id = submit(stack, api)
    pings = ping(stack, api, subscription(stack, api), 5)
    first, second = listeners.values()
    eventually(stack, lambda: len(first.events) >= 7 and len(second.events) >= 7, "7 events each")
    eventually(stack, lambda: any(e.event == "job.completed" for e in first.events), "completion")
    assert first.ids == second.ids
    assert set(pings) <= set(first.ids)
    assert [e.event for e in first.events if job_id in e.data][-1] == "job.completed"
    for listener in listeners.values():
        listener.close()


def test_reconnecting_with_last_event_id_misses_nothing_and_repeats_nothing(
    stack: Stack,
) -> None:
    """The second connection goes to another web process, as after a failover."""
    api = stack.api()
    sub_id = subscription(stack, api)
    other = Stack(stack.instance / "other", env=stack.env.copy(), simulator=False)
    other.env.update({"MOTIONHOOK_PUBLIC_URL": other.web_url})
    try:
        other.start_web()
        first = Listener(api, f"{stack.web_url}/v1/events/stream?type=test.ping")
        before = ping(stack, api, sub_id, 3)
        eventually(stack, lambda: len(first.events) == 3, "the first three")
        first.close()
        while_away = ping(stack, api, sub_id, 4)
        second = Listener(
            api,
            f"{other.web_url}/v1/events/stream?type=test.ping",
            **{"Last-Event-ID": first.ids[-1]},
        )
        after = ping(stack, api, sub_id, 2)
        eventually(stack, lambda: len(second.events) >= 6, "the rest")
        assert first.ids == before
        assert second.ids == while_away + after
        second.close()
    finally:
        other.kill()


def test_streams_past_the_bound_answer_503(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(MOTIONHOOK_STREAMS_MAX="1", MOTIONHOOK_STREAM_HEARTBEAT="1")
    stack.migrate()
    stack.start_web({"WEB_CONCURRENCY": "1"})
    api = stack.api()
    url = f"{stack.web_url}/v1/events/stream"
    first = Listener(api, url)
    refused = api.get(url, timeout=10)
    assert refused.status_code == 503
    assert refused.headers["Retry-After"]
    assert "streams" in refused.json()["message"]
    assert api.get(f"{stack.web_url}/v1/jobs", timeout=10).status_code == 200
    first.close()
    eventually(stack, lambda: _opens(api, url), "a free stream slot after the first closed")


def _opens(api: requests.Session, url: str) -> bool:
    with api.get(url, stream=True, timeout=10) as response:
        return response.status_code == 200


def test_a_job_stream_replays_the_job_and_ends_after_job_completed(stack: Stack) -> None:
    api = stack.api()
    job_id = submit(stack, api)
    listener = Listener(api, f"{stack.web_url}/v1/jobs/{job_id}/stream")
    eventually(stack, listener.ended.is_set, "the stream to end")
    types = [event.event for event in listener.events]
    assert types[-1] == "job.completed"
    assert "job.processing" in types
    # Opened again after the end, with the last id, it ends at once.
    again = Listener(
        api, f"{stack.web_url}/v1/jobs/{job_id}/stream", **{"Last-Event-ID": listener.ids[-1]}
    )
    eventually(stack, again.ended.is_set, "the resumed stream to end")
    assert again.events == []


def test_an_idle_stream_carries_a_comment_every_heartbeat(stack: Stack) -> None:
    lines: list[bytes] = []
    with stack.api().get(
        f"{stack.web_url}/v1/events/stream", stream=True, timeout=(5, 10)
    ) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for line in response.iter_lines():
            lines.append(line)
            if lines.count(b": keep-alive") == 2:
                break
    assert lines[0].startswith(b"retry:")
