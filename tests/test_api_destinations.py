"""HTTP tests for broker subscriptions: validation, masking, the guard, extras."""

from __future__ import annotations

import importlib.util
import socket
from typing import Any

import pytest
from flask.testing import FlaskClient

from schemas.destinations import mask_destination_url
from service.observability import scrub

PUBLIC_ADDRESS = "93.184.215.14"
REAL_GETADDRINFO = socket.getaddrinfo
PASSWORD = "s3cr3t-broker-password"
URLS = {
    "amqp": f"amqp://motion:{PASSWORD}@broker.example.com:5672/prod?exchange=events",
    "nats": "nats://broker.example.com:4222/motionhook.events",
    "redis": f"redis://:{PASSWORD}@broker.example.com:6379/0?stream=events&maxlen=10000",
    "sqs": "https://sqs.eu-west-1.amazonaws.com/123456789012/events.fifo",
    "eventbridge": "eventbridge://default?region=eu-west-1",
}


@pytest.fixture(autouse=True)
def public_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolve *.example.com to a public address: this machine has no outside DNS."""

    def resolve(host: str, *args: Any, **kwargs: Any) -> Any:
        if host.endswith("example.com"):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC_ADDRESS, 5672))]
        return REAL_GETADDRINFO(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)


def subscribe(client: FlaskClient, auth: dict[str, str], kind: str, url: str) -> Any:
    return client.post("/v1/subscriptions", json={"kind": kind, "url": url}, headers=auth)


@pytest.mark.parametrize("kind", sorted(URLS))
def test_broker_subscription_is_created_signed_and_masked(
    client: FlaskClient, auth: dict[str, str], kind: str
) -> None:
    created = subscribe(client, auth, kind, URLS[kind])

    assert created.status_code == 201, created.get_json()
    body = created.get_json()
    assert body["kind"] == kind
    assert body["secret"].startswith("whsec_")  # messages are signed like webhooks
    for response in (
        created,
        client.get(f"/v1/subscriptions/{body['id']}", headers=auth),
        client.get("/v1/subscriptions", headers=auth),
        client.post(f"/v1/subscriptions/{body['id']}/rotate-secret", headers=auth),
    ):
        assert response.status_code in (200, 201)
        assert PASSWORD not in response.get_data(as_text=True)
    assert body["url"] == mask_destination_url(kind, URLS[kind])


def test_passwords_and_nats_tokens_are_shown_as_stars() -> None:
    assert (
        mask_destination_url("amqp", URLS["amqp"])
        == "amqp://motion:***@broker.example.com:5672/prod?exchange=events"
    )
    assert mask_destination_url("redis", URLS["redis"]).startswith("redis://:***@broker")
    assert mask_destination_url("nats", "nats://tok3n@h:4222/s") == "nats://***@h:4222/s"
    assert mask_destination_url("nats", "nats://u:p@h:4222/s") == "nats://u:***@h:4222/s"
    assert (
        mask_destination_url("amqp", "amqp://guest@h/?exchange=x") == "amqp://guest@h/?exchange=x"
    )
    assert mask_destination_url("webhook", "https://u:p@h/") == "https://u:p@h/"


@pytest.mark.parametrize(
    ("kind", "url", "words"),
    [
        ("amqp", "amqp://broker.example.com/", "?exchange=NAME"),
        ("amqp", "http://broker.example.com/?exchange=x", "amqp://"),
        ("amqp", "amqp://broker.example.com/?exchange=&routing_key=", "routing_key=QUEUE"),
        ("amqp", "amqp://broker.example.com/?exchange=x&queue=y", "unknown query parameter queue"),
        ("nats", "nats://broker.example.com:4222", "subject"),
        ("nats", "nats://broker.example.com:4222/events.*", "wildcards"),
        ("redis", "redis://broker.example.com:6379/0", "?stream=NAME"),
        ("redis", "redis://broker.example.com/0?stream=s&maxlen=-1", "maxlen"),
        ("redis", "redis://broker.example.com/x?stream=s", "database"),
        ("redis", "redis://:***@broker.example.com/0?stream=s", "masked"),
        ("sqs", "https://sqs.us-east-1.amazonaws.com/events", "queue URL"),
        ("eventbridge", "eventbridge://default?region=mars", "region"),
        ("webhook", "amqp://broker.example.com/?exchange=x", "URL"),
    ],
)
def test_a_url_of_the_wrong_shape_is_a_422_naming_the_url(
    client: FlaskClient, auth: dict[str, str], kind: str, url: str, words: str
) -> None:
    answer = subscribe(client, auth, kind, url)

    assert answer.status_code == 422, answer.get_json()
    errors = answer.get_json()["errors"]["json"]
    assert list(errors) == ["url"]
    assert words in str(errors["url"])


def test_private_broker_hosts_are_refused_unless_listed(
    client: FlaskClient, auth: dict[str, str], app: Any
) -> None:
    url = "redis://127.0.0.1:6379/0?stream=events"
    refused = subscribe(client, auth, "redis", url)
    assert refused.status_code == 422
    assert "loopback" in refused.get_json()["errors"]["json"]["url"][0]

    services = app.extensions["motionhook"]
    allowed = services.settings.__class__(
        **{**services.settings.__dict__, "destination_allowed_hosts": ("127.0.0.1:6379",)}
    )
    services.settings = allowed
    assert subscribe(client, auth, "redis", url).status_code == 201
    # Only that port of that host.
    assert subscribe(client, auth, "redis", url.replace("6379", "6380")).status_code == 422


def test_a_kind_whose_library_is_missing_is_a_422_naming_the_extra(
    client: FlaskClient, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pika" else real(name, *a)
    )

    answer = subscribe(client, auth, "amqp", URLS["amqp"])

    assert answer.status_code == 422
    assert "motionhook[amqp]" in answer.get_json()["errors"]["json"]["kind"][0]


def test_patching_the_url_is_checked_against_the_kind(
    client: FlaskClient, auth: dict[str, str]
) -> None:
    sub = subscribe(client, auth, "redis", URLS["redis"]).get_json()
    path = f"/v1/subscriptions/{sub['id']}"

    wrong = client.patch(path, json={"url": "https://hooks.example.com/in"}, headers=auth)
    right = client.patch(path, json={"url": URLS["redis"].replace("events", "other")}, headers=auth)

    assert wrong.status_code == 422
    assert "url" in wrong.get_json()["errors"]["json"]
    assert right.status_code == 200
    assert "stream=other" in right.get_json()["url"]
    assert PASSWORD not in right.get_data(as_text=True)


def test_url_credentials_are_scrubbed_from_logs_and_sentry_events() -> None:
    event = {
        "message": f"could not publish to {URLS['amqp']}",
        "extra": {"target": URLS["redis"], "token_url": "nats://t0ken-value@h:4222/s"},
    }

    scrubbed = str(scrub(event))

    assert PASSWORD not in scrubbed
    assert "t0ken-value" not in scrubbed
    assert "amqp://motion:[redacted]@broker.example.com" in scrubbed
