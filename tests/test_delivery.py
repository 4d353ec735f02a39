"""Delivery policy end to end in one process: a real worker, real HTTP sinks on loopback.

Each scenario ends as the delivery policy says, and is checked through the deliveries API.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from standardwebhooks import Webhook

from service.delivery import PUBLISH_BATCH, Deliverer
from service.devstack import wait_until
from service.events import add_delivery
from service.extension import Services
from service.models import DEFAULT_PROJECT_ID
from service.outbound import make_session
from service.worker import Worker
from tests.sinks import Received, Sink


@pytest.fixture
def fast(services: Services) -> Services:
    """Loopback targets allowed, short timeouts and an immediate retry schedule."""
    services.settings = replace(
        services.settings,
        allow_private_targets=True,
        retry_schedule=(0.05, 0.05, 0.05),
        delivery_timeout=1.0,
        delivery_lease=5.0,
    )
    return services


@pytest.fixture
def worker(fast: Services) -> Iterator[Worker]:
    running = Worker(fast)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    yield running
    running.stop()
    thread.join(20)


@pytest.fixture
def sink() -> Iterator[Callable[..., Sink]]:
    sinks: list[Sink] = []

    def make(script: Callable[[int, Received], Any] | None = None) -> Sink:
        made = Sink(script) if script else Sink()
        sinks.append(made)
        return made

    yield make
    for made in sinks:
        made.close()


def subscribe_and_ping(
    client: FlaskClient, auth: dict[str, str], kind: str, url: str
) -> tuple[str, str]:
    sub = client.post("/v1/subscriptions", json={"kind": kind, "url": url}, headers=auth)
    assert sub.status_code == 201, sub.get_json()
    sub_id = sub.get_json()["id"]
    sent = client.post(f"/v1/subscriptions/{sub_id}/test", headers=auth).get_json()
    return sub_id, sent["delivery_id"]


def settled(
    client: FlaskClient, auth: dict[str, str], delivery_id: str, status: str = "pending"
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/v1/deliveries/{delivery_id}", headers=auth).get_json()
        return body if body["status"] != status else None

    return wait_until(check, timeout=30, message=f"delivery {delivery_id} to settle")  # type: ignore[return-value]


def subscription(client: FlaskClient, auth: dict[str, str], sub_id: str) -> dict[str, Any]:
    return client.get(f"/v1/subscriptions/{sub_id}", headers=auth).get_json()  # type: ignore[no-any-return]


def test_webhook_is_signed_and_verifies(
    client: FlaskClient, auth: dict[str, str], worker: Worker, sink: Callable[..., Sink]
) -> None:
    target = sink()
    sub = client.post(
        "/v1/subscriptions", json={"kind": "webhook", "url": target.url}, headers=auth
    ).get_json()
    client.post(f"/v1/subscriptions/{sub['id']}/test", headers=auth)
    request = target.wait_for(1)[0]
    event = Webhook(sub["secret"]).verify(request.body, request.headers)
    assert event["type"] == "test.ping"
    assert request.headers["webhook-id"] == event["id"]


def test_slack_no_service_disables_subscription(
    client: FlaskClient, auth: dict[str, str], worker: Worker, sink: Callable[..., Sink]
) -> None:
    target = sink(lambda _n, _r: (404, {"Content-Type": "text/plain"}, b"no_service"))
    sub_id, delivery_id = subscribe_and_ping(client, auth, "slack", target.url)
    delivery = settled(client, auth, delivery_id)
    assert delivery["status"] == "failed"
    assert len(delivery["attempts"]) == 1
    assert delivery["attempts"][0]["response_excerpt"] == "no_service"
    sub = subscription(client, auth, sub_id)
    assert sub["enabled"] is False
    assert "no_service" in sub["disabled_reason"]


def test_discord_unknown_webhook_disables_subscription(
    client: FlaskClient, auth: dict[str, str], worker: Worker, sink: Callable[..., Sink]
) -> None:
    body = json.dumps({"message": "Unknown Webhook", "code": 10015}).encode()
    target = sink(lambda _n, _r: (404, {"Content-Type": "application/json"}, body))
    sub_id, delivery_id = subscribe_and_ping(client, auth, "discord", target.url)
    assert settled(client, auth, delivery_id)["status"] == "failed"
    assert subscription(client, auth, sub_id)["enabled"] is False


def test_redirect_is_a_failure_and_not_followed(
    client: FlaskClient, auth: dict[str, str], worker: Worker, sink: Callable[..., Sink]
) -> None:
    elsewhere = sink()
    target = sink(lambda _n, _r: (302, {"Location": elsewhere.url}, b""))
    sub_id, delivery_id = subscribe_and_ping(client, auth, "webhook", target.url)
    delivery = settled(client, auth, delivery_id)
    assert delivery["status"] == "failed"
    assert "redirect" in delivery["last_error"]
    assert elsewhere.received == []
    assert subscription(client, auth, sub_id)["enabled"] is True


def test_endpoint_that_never_answers_is_retried_then_fails(
    client: FlaskClient, auth: dict[str, str], worker: Worker, sink: Callable[..., Sink]
) -> None:
    target = sink(lambda _n, _r: None)
    _sub_id, delivery_id = subscribe_and_ping(client, auth, "webhook", target.url)
    target.wait_for(1)
    delivery = settled(client, auth, delivery_id)
    assert delivery["attempt_count"] == 4
    assert all(a["status_code"] is None and "timed out" in a["error"] for a in delivery["attempts"])


def test_429_retry_after_is_honoured(
    client: FlaskClient, auth: dict[str, str], worker: Worker, sink: Callable[..., Sink]
) -> None:
    target = sink(
        lambda n, _r: (429, {"Retry-After": "2"}, b"slow down") if n == 1 else (200, {}, b"ok")
    )
    _sub_id, delivery_id = subscribe_and_ping(client, auth, "webhook", target.url)
    requests_seen = target.wait_for(1)
    wait_until(
        lambda: (
            client.get(f"/v1/deliveries/{delivery_id}", headers=auth).get_json()["attempt_count"]
            == 1
        ),
        timeout=10,
        message="first attempt recorded",
    )
    first = client.get(f"/v1/deliveries/{delivery_id}", headers=auth).get_json()
    assert first["status"] == "pending"
    delivery = settled(client, auth, delivery_id)
    assert delivery["status"] == "delivered"
    attempts = delivery["attempts"]
    assert [a["status_code"] for a in attempts] == [429, 200]
    from datetime import datetime

    gap = (
        datetime.fromisoformat(attempts[1]["attempted_at"])
        - datetime.fromisoformat(attempts[0]["attempted_at"])
    ).total_seconds()
    assert gap >= 1.9
    assert len(requests_seen) >= 1


def test_500_three_times_then_200_is_delivered(
    client: FlaskClient, auth: dict[str, str], worker: Worker, sink: Callable[..., Sink]
) -> None:
    target = sink(lambda n, _r: (500, {}, b"oops") if n <= 3 else (200, {}, b"ok"))
    _sub_id, delivery_id = subscribe_and_ping(client, auth, "webhook", target.url)
    delivery = settled(client, auth, delivery_id)
    assert delivery["status"] == "delivered"
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 500, 500, 200]
    bodies = {r.headers["webhook-id"] for r in target.received}
    assert len(bodies) == 1


def test_private_target_refused_at_connect_time(
    client: FlaskClient, auth: dict[str, str], fast: Services, sink: Callable[..., Sink]
) -> None:
    target = sink()
    _sub_id, delivery_id = subscribe_and_ping(client, auth, "webhook", target.url)
    fast.settings = replace(fast.settings, allow_private_targets=False)
    guarded = Worker(fast)
    thread = threading.Thread(target=guarded.run, daemon=True)
    thread.start()
    try:
        delivery = settled(client, auth, delivery_id)
    finally:
        guarded.stop()
        thread.join(20)
    assert delivery["status"] == "failed"
    assert target.received == []


def test_deliveries_to_one_broker_are_claimed_and_sent_as_batches(
    client: FlaskClient, auth: dict[str, str], fast: Services, sink: Callable[..., Sink]
) -> None:
    stream = f"mh-test-{uuid.uuid4().hex[:8]}"
    redis_id, _first = subscribe_and_ping(
        client, auth, "redis", f"redis://127.0.0.1:6379/0?stream={stream}"
    )
    webhook_id, _ping = subscribe_and_ping(client, auth, "webhook", sink().url)
    for _ in range(PUBLISH_BATCH + 9):
        client.post(f"/v1/subscriptions/{redis_id}/test", headers=auth)
    client.post(f"/v1/subscriptions/{webhook_id}/test", headers=auth)
    deliverer = Deliverer(fast, make_session(allow_private=True), "test-owner")
    try:
        claimed = deliverer.claim(100)
        # Webhooks go one by one; the 42 to Redis in batches of at most PUBLISH_BATCH.
        sizes = sorted((batch[0].kind, len(batch)) for batch in claimed)
        assert sizes == [("redis", 10), ("redis", PUBLISH_BATCH), ("webhook", 1), ("webhook", 1)]
        for batch in claimed:
            deliverer.deliver(batch)
        entries = redis.Redis().xrange(stream)
    finally:
        deliverer.close()
        redis.Redis().delete(stream)

    assert len(entries) == PUBLISH_BATCH + 10
    listed = client.get(f"/v1/deliveries?subscription_id={redis_id}", headers=auth).get_json()
    # Every delivery of a batch is settled on its own: one attempt, its own entry id.
    excerpts = set()
    for item in listed["items"]:
        delivery = client.get(f"/v1/deliveries/{item['id']}", headers=auth).get_json()
        assert delivery["status"] == "delivered"
        (attempt,) = delivery["attempts"]
        excerpts.add(attempt["response_excerpt"])
    assert len(excerpts) == PUBLISH_BATCH + 10


def test_a_delivery_without_an_event_that_is_no_chat_reply_fails_unsent(
    client: FlaskClient, auth: dict[str, str], fast: Services, sink: Callable[..., Sink]
) -> None:
    receiver = sink()
    with fast.db.transaction() as session:
        delivery_id = add_delivery(
            session,
            None,
            project_id=DEFAULT_PROJECT_ID,
            kind="webhook",
            subscription_id=None,
            target_url=receiver.url,
            job_id=None,
        ).id
    deliverer = Deliverer(fast, make_session(allow_private=True), owner="test")
    assert deliverer.claim(10) == []
    deliverer.close()
    body = client.get(f"/v1/deliveries/{delivery_id}", headers=auth).get_json()
    assert (body["status"], body["last_error"], body["attempts"]) == (
        "failed",
        "no event to send",
        [],
    )
    assert receiver.received == []
