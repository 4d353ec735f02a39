"""Real HTTP sinks on 127.0.0.1 for delivery tests: scripted answers, recorded requests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Answer = tuple[int, dict[str, str], bytes]
Script = Callable[[int, "Received"], Answer | None]


class _Server(ThreadingHTTPServer):
    # A listen backlog like a real server's (http.server's default is 5): several
    # workers opening connections at once must not see SYNs dropped.
    request_queue_size = 128
    daemon_threads = True


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Sink:
    """An HTTP server that records every POST and answers from a script.

    ``script(n, request)`` gets the 1-based request number and returns
    ``(status, headers, body)``, or None to hang until the sink is released.
    """

    script: Script = field(default=lambda _n, _r: (200, {}, b"ok"))
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lock = threading.Condition()
        self.release = threading.Event()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with sink.lock:
                    sink.received.append(request)
                    number = len(sink.received)
                    sink.lock.notify_all()
                answer = sink.script(number, request)
                if answer is None:
                    sink.release.wait(30)
                    return
                status, headers, payload = answer
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def wait_for(self, count: int, timeout: float = 15) -> list[Received]:
        """Block until at least ``count`` requests arrived (or fail after ``timeout``)."""
        with self.lock:
            if not self.lock.wait_for(lambda: len(self.received) >= count, timeout):
                raise TimeoutError(f"sink got {len(self.received)} of {count} requests")
            return list(self.received)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
