"""Outbound safety: target URL validation and the connect-time filter of the shared session."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from service.devstack import wait_until
from service.outbound import TargetRefused, make_session, validate_target_url
from tests.sinks import Answer, Received
from tests.sinks import Sink as ScriptedSink

REAL_GETADDRINFO = socket.getaddrinfo


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignore clients that hang up early (timeouts are the point of some tests)."""


class Sink:
    """A real HTTP server on 127.0.0.1 with a few scripted paths, recording what it receives."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str]]] = []
        self.release = threading.Event()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                sink.received.append((self.path, dict(self.headers)))
                if self.path == "/hang":
                    sink.release.wait(10)
                    return
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "/target")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                """Keep test output clean."""

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        return [path for path, _ in self.received]


@pytest.fixture
def sink() -> Iterator[Sink]:
    server = Sink()
    server.thread.start()
    yield server
    server.release.set()
    server.server.shutdown()
    server.server.server_close()
    server.thread.join(timeout=5)


def fake_dns(mapping: dict[str, list[str]]) -> Any:
    """Return a getaddrinfo answering ``mapping`` hosts and delegating every other host."""

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in mapping:
            answers = []
            for address in mapping[host]:
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                sockaddr: tuple[Any, ...] = (address, port or 80)
                if family == socket.AF_INET6:
                    sockaddr = (address, port or 80, 0, 0)
                answers.append((family, socket.SOCK_STREAM, 6, "", sockaddr))
            return answers
        return REAL_GETADDRINFO(host, port, *args, **kwargs)

    return getaddrinfo


# --- validate_target_url -------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/file", "url must use http or https"),
        ("javascript:alert(1)", "url must use http or https"),
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata address (169.254.169.254)"),
        ("http://[fd00:ec2::254]/", "cloud metadata address (fd00:ec2::254)"),
        ("http://168.63.129.16/machine?comp=goalstate", "cloud metadata address (168.63.129.16)"),
        ("http://localhost/", "loopback address"),
        ("http://10.1.2.3/", "private address (10.1.2.3)"),
        ("http://[::1]/", "loopback address (::1)"),
        ("http://[::ffff:169.254.169.254]/", "cloud metadata address"),
        ("http://[::ffff:10.0.0.1]/", "private address"),
        ("http://100.64.0.1/", "shared address (100.64.0.1)"),
        ("http://0.0.0.0/", "unspecified address"),
        ("http://224.0.0.1/", "multicast address"),
        ("http://192.168.1.1:8080/", "private address (192.168.1.1)"),
        ("http://2130706433/", "loopback address (127.0.0.1)"),
        ("http:///no-host", "url must include a host"),
        ("http://example.com:99999/", "url has an invalid port"),
    ],
)
def test_validate_refuses_unsafe_targets(url: str, reason: str) -> None:
    with pytest.raises(TargetRefused, match=reason.replace("(", r"\(").replace(")", r"\)")):
        validate_target_url(url, allow_private=False)


def test_validate_refuses_hostname_resolving_to_private_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", fake_dns({"hooks.example": ["10.1.2.3"]}))

    with pytest.raises(TargetRefused, match=r"url resolves to a private address \(10\.1\.2\.3\)"):
        validate_target_url("https://hooks.example/in", allow_private=False)


def test_validate_refuses_when_any_resolved_address_is_private(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dns = fake_dns({"mixed.example": ["93.184.216.34", "2606:2800:220:1::1", "127.0.0.1"]})
    monkeypatch.setattr(socket, "getaddrinfo", dns)

    with pytest.raises(TargetRefused, match="loopback"):
        validate_target_url("https://mixed.example/", allow_private=False)


def test_validate_accepts_hostname_resolving_to_public_addresses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dns = fake_dns({"public.example": ["93.184.216.34", "2606:2800:220:1::1"]})
    monkeypatch.setattr(socket, "getaddrinfo", dns)

    validate_target_url("https://public.example/hook?x=1", allow_private=False)


def test_validate_refuses_unresolvable_host(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_such_host(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)

    with pytest.raises(TargetRefused, match="url host does not resolve"):
        validate_target_url("https://nowhere.example/", allow_private=False)


def test_refusal_message_never_contains_url_secrets() -> None:
    with pytest.raises(TargetRefused) as caught:
        validate_target_url("http://10.1.2.3/services/T0/B0/SECRET?token=abc", allow_private=False)

    assert "SECRET" not in str(caught.value)
    assert "token" not in str(caught.value)


def test_allow_private_accepts_loopback_but_still_checks_scheme() -> None:
    validate_target_url("http://127.0.0.1:8000/hook", allow_private=True)
    validate_target_url("http://localhost/", allow_private=True)
    with pytest.raises(TargetRefused, match="http or https"):
        validate_target_url("file:///etc/passwd", allow_private=True)


def test_target_refused_is_a_value_error_and_a_request_exception() -> None:
    assert issubclass(TargetRefused, ValueError)
    assert issubclass(TargetRefused, requests.RequestException)


# --- make_session: connect-time filter ------------------------------------------------


def test_session_refuses_loopback_at_connect_time(sink: Sink) -> None:
    session = make_session(allow_private=False)

    with pytest.raises(TargetRefused, match=r"loopback address \(127\.0\.0\.1\)"):
        session.post(f"{sink.url}/hook", data=b"{}", timeout=2)

    assert sink.received == []


def test_session_refuses_hostname_resolving_to_loopback(sink: Sink) -> None:
    session = make_session(allow_private=False)

    with pytest.raises(TargetRefused, match="loopback address"):
        session.get(f"http://localhost:{sink.port}/hook", timeout=2)

    assert sink.received == []


def test_session_closes_the_dns_rebinding_window(
    sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = iter([["93.184.216.34"]])

    def rebinding_dns(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "rebind.example":
            # The first answer (seen by validation) is public, every later one is loopback.
            address = next(answers, ["127.0.0.1"])
            return fake_dns({host: address})(host, port)
        return REAL_GETADDRINFO(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_dns)
    url = f"http://rebind.example:{sink.port}/hook"
    validate_target_url(url, allow_private=False)

    with pytest.raises(TargetRefused, match="loopback"):
        make_session(allow_private=False).post(url, data=b"{}", timeout=2)

    assert sink.received == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("http://10.1.2.3/hook", "private"),
        ("https://10.1.2.3/hook", "private"),
        ("http://100.64.0.1/hook", "shared"),
        ("http://192.0.0.8/hook", "reserved"),
    ],
)
def test_session_refuses_private_targets_before_connecting(url: str, reason: str) -> None:
    session = make_session(allow_private=False)

    with pytest.raises(TargetRefused, match=reason):
        session.post(url, data=b"{}", timeout=1)


def test_session_with_allow_private_connects_to_loopback(sink: Sink) -> None:
    session = make_session(allow_private=True)

    response = session.post(f"{sink.url}/hook", data=b"{}", timeout=2)

    assert response.status_code == 200
    assert response.content == b"ok"
    assert sink.paths() == ["/hook"]


def test_session_never_follows_redirects(sink: Sink) -> None:
    session = make_session(allow_private=True)

    response = session.get(f"{sink.url}/redirect", timeout=2, allow_redirects=True)

    assert response.status_code == 302
    assert response.headers["Location"] == "/target"
    assert sink.paths() == ["/redirect"]


def test_session_applies_a_default_timeout(sink: Sink) -> None:
    session = make_session(allow_private=True, default_timeout=(0.5, 0.5))

    with pytest.raises(requests.Timeout):
        session.post(f"{sink.url}/hang", data=b"{}")


def test_session_sends_the_user_agent(sink: Sink) -> None:
    session = make_session(allow_private=True, user_agent="motionhook-test/1")

    session.get(f"{sink.url}/ua", timeout=2)

    assert sink.received[0][1]["User-Agent"] == "motionhook-test/1"


def test_session_ignores_proxy_environment(sink: Sink, monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy would connect on our behalf and bypass the address filter.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "")

    response = make_session(allow_private=True).get(f"{sink.url}/direct", timeout=2)

    assert response.status_code == 200


@pytest.mark.parametrize("allow_private", [True, False])
def test_session_pools_connections(allow_private: bool) -> None:
    session = make_session(allow_private=allow_private, per_host=7, hosts=9)

    for prefix in ("http://", "https://"):
        adapter: Any = session.get_adapter(prefix + "example.com/")
        assert adapter.poolmanager.connection_pool_kw["maxsize"] == 7
        assert adapter.poolmanager.connection_pool_kw["block"] is True
        assert adapter.poolmanager.pools._maxsize == 9


def test_session_opens_at_most_per_host_connections_to_one_host() -> None:
    in_flight = peak = 0
    counting = threading.Lock()
    gate = threading.Event()

    def hold(_number: int, _request: Received) -> Answer:
        nonlocal in_flight, peak
        with counting:
            in_flight += 1
            peak = max(peak, in_flight)
        gate.wait(10)
        with counting:
            in_flight -= 1
        return 200, {}, b"ok"

    sink = ScriptedSink(hold)
    session = make_session(allow_private=True, per_host=2)
    try:
        with ThreadPoolExecutor(5) as pool:
            answers = [
                pool.submit(session.post, sink.url, data=b"{}", timeout=10) for _ in range(5)
            ]
            wait_until(lambda: in_flight == 2, timeout=10, message="two requests at the sink")
            gate.set()
            statuses = [answer.result().status_code for answer in answers]
    finally:
        gate.set()
        sink.close()
    assert statuses == [200] * 5
    assert peak == 2  # the other three waited for a pooled connection
