"""A lean HTTP/1.1 sink on 127.0.0.1 that answers 200 and timestamps every request.

``tests/sinks.py`` (``http.server``) is the sink for behaviour tests; it spends
more CPU per request than the worker it measures would on 2 cores. This one is an
asyncio protocol with keep-alive and no header parsing beyond what it needs, so
the fan-out numbers measure motionhook rather than the receiver.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


@dataclass(frozen=True)
class Receipt:
    """One request as the sink saw it; ``at`` is wall-clock ``time.time()``."""

    at: float
    path: str
    webhook_id: str
    body: bytes


class _Protocol(asyncio.Protocol):
    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1")
            lines = head.split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            parts = lines[0].split(" ")
            path = parts[1] if len(parts) > 1 else "/"
            self.sink.record(Receipt(time.time(), path, headers.get("webhook-id", ""), body))
            assert self.transport is not None
            self.transport.write(RESPONSE)


@dataclass
class Sink:
    """Serve on a free port in a background thread until :meth:`close`."""

    keep_bodies: bool = True
    receipts: list[Receipt] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.condition = threading.Condition()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.port = 0

        async def serve() -> None:
            server = await self.loop.create_server(
                lambda: _Protocol(self), "127.0.0.1", 0, backlog=1024
            )
            self.port = server.sockets[0].getsockname()[1]
            started.set()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(serve())
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="bench-sink", daemon=True)
        self.thread.start()
        started.wait(10)

    def url(self, name: str = "hook") -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def record(self, receipt: Receipt) -> None:
        if not self.keep_bodies:
            receipt = Receipt(receipt.at, receipt.path, receipt.webhook_id, b"")
        with self.condition:
            self.receipts.append(receipt)
            self.condition.notify_all()

    def count(self) -> int:
        with self.condition:
            return len(self.receipts)

    def wait_for(self, count: int, timeout: float) -> list[Receipt]:
        """Block until ``count`` requests arrived; raise TimeoutError after ``timeout`` s."""
        with self.condition:
            if not self.condition.wait_for(lambda: len(self.receipts) >= count, timeout):
                raise TimeoutError(f"sink got {len(self.receipts)} of {count} requests")
            return list(self.receipts)

    def snapshot(self) -> list[Receipt]:
        with self.condition:
            return list(self.receipts)

    def clear(self) -> None:
        with self.condition:
            self.receipts.clear()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
