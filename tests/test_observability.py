"""Structured logs, request ids, redaction, and metrics that move as jobs flow."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.test import Client

from service import create_app
from service.callbacks import callback_token
from service.devstack import SAMPLE_IMAGE, Stack, free_port, wait_until
from service.extension import Services
from service.metrics import Heartbeat, worker_wsgi_app
from service.migrate import upgrade
from service.observability import (
    JsonFormatter,
    RedactionFilter,
    bind,
    redact,
    register_secrets,
    scrub,
)
from service.worker import Worker
from tests.conftest import CALLBACK_SECRET, TOKEN, app_config
from tests.local_http import LocalServer, Received

JSON = {"Content-Type": "application/json"}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRET_SIG = "c2lnLXZhbHVlLXRoYXQtaXMtc2VjcmV0"
MODELSLAB_KEY = "ml-key-7f3a9c1e55d2"
WEBHOOK_SECRET = "whsec_c2VjcmV0LWJ5dGVzLWZvci10ZXN0cw=="

# -- helpers ---------------------------------------------------------------------------


def capture_logs(logger: logging.Logger) -> tuple[io.StringIO, logging.Handler]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactionFilter())
    logger.addHandler(handler)
    return stream, handler


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape(client: FlaskClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    return parse_metrics(response.get_data(as_text=True))


# -- logs ------------------------------------------------------------------------------


def test_log_lines_are_json_with_the_bound_context() -> None:
    logger = logging.getLogger("motionhook.test.context")
    logger.setLevel(logging.INFO)
    stream, handler = capture_logs(logger)
    try:
        with bind(job_id="job_abc", track_id="job_abc", delivery_id="dlv_1"):
            logger.info("sent %s", "it", extra={"subscription_id": "sub_9", "http_status": 204})
        logger.info("after")
    finally:
        logger.removeHandler(handler)
    inside, after = json_lines(stream.getvalue())
    assert inside["message"] == "sent it"
    assert inside["level"] == "INFO"
    assert inside["logger"] == "motionhook.test.context"
    assert (inside["job_id"], inside["track_id"]) == ("job_abc", "job_abc")
    assert (inside["delivery_id"], inside["subscription_id"]) == ("dlv_1", "sub_9")
    assert inside["http_status"] == 204
    assert {"time", "pid", "component"} <= set(inside)
    assert "job_id" not in after


def test_secrets_never_reach_a_log_line() -> None:
    register_secrets(MODELSLAB_KEY)
    logger = logging.getLogger("motionhook.test.secrets")
    logger.setLevel(logging.INFO)
    stream, handler = capture_logs(logger)
    try:
        logger.info("auth header was Bearer %s", "tok_live_abcdefgh123")
        logger.info("callback to https://h/v1/callbacks/modelslab/job_1?sig=%s&x=1", SECRET_SIG)
        logger.info("subscription secret %s", WEBHOOK_SECRET)
        logger.info("upstream body %s", json.dumps({"key": "another-key-4242", "prompt": "cat"}))
        logger.info("plain key %s", MODELSLAB_KEY)
        logger.info(
            "extras",
            extra={
                "api_key": "extra-key-1",
                "webhook_secret": "extra-s-2",
                "body": {"key": "nested-key-3", "ok": "visible"},
            },
        )
        try:
            raise RuntimeError(f"upstream refused key {MODELSLAB_KEY}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    for secret in (
        "tok_live_abcdefgh123",
        SECRET_SIG,
        WEBHOOK_SECRET,
        "c2VjcmV0LWJ5dGVz",
        "another-key-4242",
        MODELSLAB_KEY,
        "extra-key-1",
        "extra-s-2",
        "nested-key-3",
    ):
        assert secret not in output, secret
    assert "visible" in output and "cat" in output
    assert len(json_lines(output)) == 7


def test_redact_and_scrub_keep_harmless_text() -> None:
    assert redact("GET /media/a.mp4?exp=1&sig=abcdef") == "GET /media/a.mp4?exp=1&sig=[redacted]"
    assert redact("sig=abcdef") == "sig=[redacted]"
    assert redact("no secrets here") == "no secrets here"
    scrubbed = scrub({"Authorization": "Bearer x", "image_key": "jobs/a.png", "n": 3})
    assert scrubbed == {"Authorization": "[redacted]", "image_key": "jobs/a.png", "n": 3}


# -- request ids -----------------------------------------------------------------------


def test_request_id_is_honoured_and_echoed(client: FlaskClient) -> None:
    response = client.get("/healthz", headers={"X-Request-ID": "req-42.a_b"})
    assert response.headers["X-Request-ID"] == "req-42.a_b"


def test_request_id_is_made_when_missing_or_unsafe(client: FlaskClient) -> None:
    made = client.get("/healthz").headers["X-Request-ID"]
    assert len(made) == 32
    unsafe = client.get("/healthz", headers={"X-Request-ID": 'x" injected'}).headers
    assert unsafe["X-Request-ID"] not in ('x" injected', made)
    assert (
        client.get("/healthz", headers={"X-Request-ID": "a" * 200}).headers["X-Request-ID"]
        != "a" * 200
    )


def test_logs_inside_a_request_carry_its_id_and_track_id(app: Flask) -> None:
    logger = logging.getLogger("motionhook.test.request")
    logger.setLevel(logging.INFO)

    def view(track_id: str) -> dict[str, str]:
        logger.info("inside")
        return {"track_id": track_id}

    app.add_url_rule("/_test/log/<track_id>", view_func=view)
    stream, handler = capture_logs(logger)
    try:
        response = app.test_client().get("/_test/log/job_xyz", headers={"X-Request-ID": "r-1"})
    finally:
        logger.removeHandler(handler)
    assert response.status_code == 200
    (line,) = json_lines(stream.getvalue())
    assert (line["request_id"], line["job_id"], line["track_id"]) == ("r-1", "job_xyz", "job_xyz")


def test_security_headers_on_api_answers(client: FlaskClient) -> None:
    response = client.get("/v1/jobs", headers=AUTH)
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["Cache-Control"] == "no-store"
    assert "Retry-After" not in response.headers


# -- metrics in one process, as a job flows ------------------------------------------


@pytest.fixture
def upstream() -> Iterator[LocalServer]:
    """A ModelsLab stand-in that accepts every job as ``processing``."""

    def respond(_request: Received) -> tuple[int, dict[str, str], bytes]:
        body = {"status": "processing", "id": 146, "eta": 30, "output": []}
        return 200, JSON, json.dumps(body).encode()

    with LocalServer(respond) as server:
        yield server


@pytest.fixture
def flow_app(
    tmp_path: Path, stack_database_url: str, upstream: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Flask]:
    monkeypatch.setenv("MOTIONHOOK_INSTANCE_PATH", str(tmp_path / "instance"))
    config = app_config(
        stack_database_url,
        tmp_path,
        ALLOW_PRIVATE_TARGETS=True,
        MODELSLAB_BASE_URL=f"{upstream.url}/api/v6",
        RETRY_SCHEDULE="60",
    )
    flask_app = create_app(config)
    services: Services = flask_app.extensions["motionhook"]
    upgrade(services.db)
    yield flask_app
    services.db.dispose()


def post_callback(client: FlaskClient, track_id: str, body: Any, sig: str | None = None) -> Any:
    token = callback_token(CALLBACK_SECRET, track_id) if sig is None else sig
    return client.post(
        f"/v1/callbacks/modelslab/{track_id}?sig={token}", data=json.dumps(body), headers=JSON
    )


def test_metrics_move_as_a_job_flows(flow_app: Flask) -> None:
    client = flow_app.test_client()
    services: Services = flow_app.extensions["motionhook"]
    with LocalServer() as sink, LocalServer(lambda _r: (410, {}, b"gone")) as gone:
        created = client.post(
            "/v1/subscriptions",
            json={"kind": "webhook", "url": f"{gone.url}/hook", "events": ["job.processing"]},
            headers=AUTH,
        )
        assert created.status_code == 201, created.get_json()
        before = scrape(client)
        job = client.post(
            "/v1/jobs",
            json={"init_image": "https://example.com/cat.png", "webhook_url": f"{sink.url}/h"},
            headers=AUTH,
        ).get_json()
        queued = scrape(client)
        assert value(queued, "motionhook_jobs", status="queued") == 1
        assert value(queued, "motionhook_queue_depth", queue="tasks", kind="submit") == 1
        assert value(queued, "motionhook_queue_pending", queue="tasks", kind="submit") == 1

        Worker(services).run(once=True)

        worked = scrape(client)
        assert value(worked, "motionhook_jobs", status="processing") == 1
        assert value(worked, "motionhook_jobs", status="queued") == 0
        assert value(worked, "motionhook_queue_depth", queue="tasks", kind="submit") == 0
        assert value(worked, "motionhook_queue_pending", queue="tasks", kind="reconcile") == 1
        assert value(worked, "motionhook_job_oldest_age_seconds", status="processing") > 0
        assert len(sink.received) == 1 and len(gone.received) == 1
        moved = delta(before, worked)
        assert (
            moved("motionhook_upstream_requests_total", operation="submit", outcome="result") == 1
        )
        assert moved("motionhook_upstream_request_duration_seconds_count", operation="submit") == 1
        assert (
            moved("motionhook_delivery_attempts_total", channel="webhook", outcome="delivered") == 1
        )
        assert (
            moved("motionhook_delivery_attempts_total", channel="webhook", outcome="permanent") == 1
        )
        assert moved("motionhook_delivery_duration_seconds_count", channel="webhook") == 2
        assert moved("motionhook_subscription_disablements_total", channel="webhook") == 1
        assert value(worked, "motionhook_subscriptions_disabled", channel="webhook") == 1
        recent = "motionhook_deliveries_last_day"
        assert value(worked, recent, kind="webhook", status="delivered") == 1
        assert value(worked, recent, kind="webhook", status="failed") == 1
        assert value(worked, recent, kind="slack", status="pending") == 0
        attempts = "motionhook_delivery_attempts_recent"
        assert value(worked, attempts, outcome="delivered") == 1
        assert value(worked, attempts, outcome="permanent") == 1
        assert value(worked, attempts, outcome="retry") == 0

        failed = {"status": "failed", "id": 146, "message": "nsfw", "track_id": job["id"]}
        assert post_callback(client, job["id"], failed).status_code == 200
        assert post_callback(client, job["id"], failed).status_code == 200
        assert post_callback(client, job["id"], failed, sig="forged-signature").status_code == 401
        after = scrape(client)
    moved = delta(worked, after)
    assert moved("motionhook_callbacks_received_total", outcome="applied") == 1
    assert moved("motionhook_callbacks_received_total", outcome="duplicate") == 1
    assert moved("motionhook_callbacks_received_total", outcome="rejected") == 1
    assert value(after, "motionhook_jobs", status="failed") == 1
    assert value(after, "motionhook_queue_depth", queue="deliveries", kind="webhook") == 1
    assert value(after, "motionhook_deliveries_last_day", kind="webhook", status="pending") == 1
    assert (
        value(after, "motionhook_queue_oldest_due_age_seconds", queue="deliveries", kind="webhook")
        >= 0
    )
    assert value(after, "motionhook_database_up") == 1


def delta(before: Samples, after: Samples) -> Callable[..., float]:
    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    return moved


def test_metrics_token_guards_the_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOTIONHOOK_INSTANCE_PATH", str(tmp_path / "instance"))
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    client = create_app(app_config(url, tmp_path, METRICS_TOKEN="scrape-me-123")).test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    allowed = client.get("/metrics", headers={"Authorization": "Bearer scrape-me-123"})
    assert allowed.status_code == 200
    assert b"motionhook_database_up 0.0" in allowed.data  # not migrated: gauges say so


PRODUCTION = {"ENV": "production", "ALLOW_SQLITE_IN_PRODUCTION": True}


@pytest.mark.parametrize("opened", [{}, {"METRICS_PUBLIC": "1"}])
def test_production_closes_metrics_without_a_token_unless_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opened: dict[str, str]
) -> None:
    monkeypatch.setenv("MOTIONHOOK_INSTANCE_PATH", str(tmp_path / "instance"))
    config = app_config(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, **PRODUCTION, **opened)
    app = create_app(config)
    web = app.test_client().get("/metrics")
    worker = Client(worker_wsgi_app(app.extensions["motionhook"], Heartbeat())).get("/metrics")
    if opened:
        assert web.status_code == worker.status_code == 200
        return
    assert web.status_code == worker.status_code == 403
    for body in (web.get_json(), worker.get_json()):
        assert "MOTIONHOOK_METRICS_TOKEN" in body["message"]
        assert "MOTIONHOOK_METRICS_PUBLIC" in body["message"]


def test_production_serves_metrics_to_the_metrics_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOTIONHOOK_INSTANCE_PATH", str(tmp_path / "instance"))
    config = app_config(
        f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, **PRODUCTION, METRICS_TOKEN="scrape-me-123"
    )
    client = create_app(config).test_client()
    assert client.get("/metrics").status_code == 401
    assert (
        client.get("/metrics", headers={"Authorization": "Bearer scrape-me-123"}).status_code == 200
    )


# -- real processes --------------------------------------------------------------------


def scrape_url(url: str) -> Samples:
    response = requests.get(url, timeout=10)
    assert response.status_code == 200, response.text
    return parse_metrics(response.text)


@pytest.mark.e2e
def test_gunicorn_workers_add_up_their_counters(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    stack = make_stack(MOTIONHOOK_CALLBACK_SECRET=CALLBACK_SECRET)
    stack.migrate()
    web = stack.start_web({"WEB_CONCURRENCY": "2", "PROMETHEUS_MULTIPROC_DIR": str(multiproc)})
    url = f"{stack.web_url}/v1/callbacks/modelslab/job_nope?sig=forged-signature"
    sent = 0

    def reject_batch() -> set[int]:
        nonlocal sent
        with ThreadPoolExecutor(8) as pool:
            codes = list(
                pool.map(lambda _i: requests.post(url, json={}, timeout=10).status_code, range(16))
            )
        sent += len(codes)
        assert set(codes) == {401}
        pids = {
            line["pid"]
            for line in json_lines(web.log())
            if line.get("logger") == "gunicorn.access" and line.get("status") == 401
        }
        return pids if len(pids) >= 2 else set()

    served_by = wait_until(reject_batch, timeout=60, message="both gunicorn workers serving")
    assert len(served_by) == 2  # type: ignore[arg-type]
    for _ in range(4):  # whichever worker answers the scrape, the total is the same
        samples = scrape_url(f"{stack.web_url}/metrics")
        assert value(samples, "motionhook_callbacks_received_total", outcome="rejected") == sent
        assert value(samples, "motionhook_database_up") == 1
    assert len(list(multiproc.glob("counter_*.db"))) >= 2
    log_lines = json_lines(web.log())
    assert all(line["component"] == "web" for line in log_lines)
    assert "forged-signature" not in web.log()


@pytest.mark.e2e
def test_worker_logs_json_and_serves_its_metrics(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    port = str(free_port())
    stack = make_stack(MOTIONHOOK_CALLBACK_SECRET=CALLBACK_SECRET)
    stack.start_all()
    worker = next(p for p in stack.processes if p.name == "worker")
    stack.processes.remove(worker)
    worker.stop()
    worker = stack.start_worker(
        {"MOTIONHOOK_WORKER_METRICS_PORT": port, "MOTIONHOOK_WORKER_METRICS_HOST": "127.0.0.1"}
    )
    metrics_url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _answers(f"{metrics_url}/healthz"), timeout=30, message="worker endpoint")
    with SAMPLE_IMAGE.open("rb") as image:
        job = (
            stack.api()
            .post(
                f"{stack.web_url}/v1/jobs",
                files={"image": image},
                data={"prompt": "zoom"},
                timeout=10,
            )
            .json()
        )

    def completed() -> bool:
        answer = stack.api().get(f"{stack.web_url}/v1/jobs/{job['id']}", timeout=10).json()
        return bool(answer["status"] == "completed")

    wait_until(completed, timeout=90, message="job completed")
    samples = scrape_url(f"{metrics_url}/metrics")
    assert (
        value(samples, "motionhook_upstream_requests_total", operation="submit", outcome="result")
        >= 1
    )
    assert requests.get(f"{metrics_url}/readyz", timeout=10).json()["ready"] is True
    lines = json_lines(worker.log())
    assert lines and all(line["component"] == "worker" for line in lines)
    assert any(
        line.get("job_id") == job["id"] and line.get("track_id") == job["id"] for line in lines
    )
    assert TOKEN not in worker.log()


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False
