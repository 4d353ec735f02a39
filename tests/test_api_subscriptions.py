"""HTTP tests for /v1/subscriptions and /v1/deliveries, and the fan-out they cause."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from service.extension import Services
from service.models import Delivery

HOOK = "https://hooks.example.com/in"
PUBLIC_ADDRESS = "93.184.215.14"
REAL_GETADDRINFO = socket.getaddrinfo


@pytest.fixture(autouse=True)
def public_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Resolve *.example.com to a public address: this machine has no outside DNS."""
    names: dict[str, str] = {}

    def resolve(host: str, *args: Any, **kwargs: Any) -> Any:
        if host in names:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (names[host], 443))]
        if host.endswith("example.com"):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC_ADDRESS, 443))]
        return REAL_GETADDRINFO(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    return names


def subscribe(client: FlaskClient, auth: dict[str, str], **body: Any) -> Any:
    return client.post(
        "/v1/subscriptions", json={"kind": "webhook", "url": HOOK, **body}, headers=auth
    )


def test_create_webhook_subscription_shows_secret_once(
    client: FlaskClient, auth: dict[str, str]
) -> None:
    created = subscribe(client, auth, events=["job.completed"], description="ci")
    assert created.status_code == 201
    body = created.get_json()
    assert body["secret"].startswith("whsec_")
    assert body["events"] == ["job.completed"]
    fetched = client.get(f"/v1/subscriptions/{body['id']}", headers=auth).get_json()
    assert "secret" not in fetched
    listed = client.get("/v1/subscriptions", headers=auth).get_json()["items"]
    assert [item["id"] for item in listed] == [body["id"]]
    assert "secret" not in listed[0]


def test_chat_subscriptions_have_no_secret_and_default_to_all_events(
    client: FlaskClient, auth: dict[str, str]
) -> None:
    body = subscribe(client, auth, kind="slack").get_json()
    assert "secret" not in body
    assert body["events"] == ["job.processing", "job.completed", "job.failed"]


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x",
        "http://169.254.169.254/latest/meta-data",
        "http://localhost:8000/",
        "http://127.0.0.1/",
        "http://10.0.0.7/hook",
    ],
)
def test_unsafe_urls_are_refused(client: FlaskClient, auth: dict[str, str], url: str) -> None:
    response = subscribe(client, auth, url=url)
    assert response.status_code == 422
    assert "url" in response.get_json()["message"]


def test_hostname_resolving_to_private_address_is_refused(
    client: FlaskClient, auth: dict[str, str], public_dns: dict[str, str]
) -> None:
    public_dns["internal.example.com"] = "10.1.2.3"
    response = subscribe(client, auth, url="https://internal.example.com/hook")
    assert response.status_code == 422
    assert "10.1.2.3" in response.get_json()["message"]


def test_unknown_event_type_and_kind_are_422(client: FlaskClient, auth: dict[str, str]) -> None:
    bad_event = subscribe(client, auth, events=["job.exploded"])
    assert bad_event.status_code == 422
    assert "events" in bad_event.get_json()["message"]
    bad_kind = subscribe(client, auth, kind="teams")
    assert bad_kind.status_code == 422
    assert "kind" in bad_kind.get_json()["message"]


def test_events_may_list_every_event_type_including_test_ping(
    client: FlaskClient, auth: dict[str, str]
) -> None:
    every = ["job.processing", "job.completed", "job.failed", "test.ping"]
    created = subscribe(client, auth, events=every)
    assert created.status_code == 201, created.get_json()
    assert created.get_json()["events"] == every
    path = f"/v1/subscriptions/{created.get_json()['id']}"
    patched = client.patch(path, json={"events": ["test.ping"]}, headers=auth)
    assert patched.status_code == 200, patched.get_json()
    assert patched.get_json()["events"] == ["test.ping"]


def test_patch_disable_enable_and_delete(client: FlaskClient, auth: dict[str, str]) -> None:
    sub = subscribe(client, auth).get_json()
    path = f"/v1/subscriptions/{sub['id']}"
    disabled = client.patch(path, json={"enabled": False}, headers=auth).get_json()
    assert disabled["enabled"] is False
    assert disabled["disabled_reason"]
    enabled = client.patch(
        path, json={"enabled": True, "events": ["job.failed"], "description": "x"}, headers=auth
    ).get_json()
    assert enabled["enabled"] is True and enabled["disabled_reason"] is None
    assert enabled["events"] == ["job.failed"]
    assert client.patch(path, json={"url": "http://10.0.0.1/"}, headers=auth).status_code == 422
    assert client.patch(path, json={"secret": "x"}, headers=auth).status_code == 422
    assert client.delete(path, headers=auth).status_code == 204
    assert client.get(path, headers=auth).status_code == 404


def test_rotate_secret_keeps_previous_for_a_day(
    client: FlaskClient, auth: dict[str, str], services: Services
) -> None:
    from datetime import timedelta

    from service.delivery import active_secrets
    from service.models import Subscription, utcnow

    sub = subscribe(client, auth).get_json()
    rotated = client.post(f"/v1/subscriptions/{sub['id']}/rotate-secret", headers=auth)
    assert rotated.status_code == 200
    new_secret = rotated.get_json()["secret"]
    assert new_secret != sub["secret"]
    with services.db.transaction() as session:
        row = session.get(Subscription, sub["id"])
        assert row is not None
        assert active_secrets(row, utcnow()) == [new_secret, sub["secret"]]
        assert active_secrets(row, utcnow() + timedelta(hours=25)) == [new_secret]
    slack = subscribe(client, auth, kind="slack").get_json()
    assert (
        client.post(f"/v1/subscriptions/{slack['id']}/rotate-secret", headers=auth).status_code
        == 409
    )


def test_job_event_fans_out_to_matching_subscriptions_and_job_webhook(
    client: FlaskClient, auth: dict[str, str], services: Services, post_callback: Any
) -> None:
    completed_only = subscribe(client, auth, events=["job.completed"]).get_json()
    everything = subscribe(client, auth, kind="discord").get_json()
    subscribe(client, auth, kind="slack", enabled=False)
    job = client.post(
        "/v1/jobs",
        json={
            "init_image": "https://example.com/a.png",
            "webhook_url": "https://example.com/job-hook",
            "webhook_events": ["job.failed"],
        },
        headers=auth,
    ).get_json()
    post_callback(job["id"], {"status": "failed", "message": "boom"})
    with services.db.transaction() as session:
        rows = list(session.scalars(select(Delivery).where(Delivery.job_id == job["id"])))
    targets = sorted((d.subscription_id or d.target_url or "") for d in rows)
    assert targets == sorted([everything["id"], "https://example.com/job-hook"])
    assert completed_only["id"] not in targets
    listed = client.get(f"/v1/deliveries?job_id={job['id']}", headers=auth).get_json()
    assert {item["event_type"] for item in listed["items"]} == {"job.failed"}
    assert all(item["status"] == "pending" for item in listed["items"])


def test_test_event_recover_and_retry(
    client: FlaskClient, auth: dict[str, str], services: Services
) -> None:
    sub = subscribe(client, auth).get_json()
    sent = client.post(f"/v1/subscriptions/{sub['id']}/test", headers=auth)
    assert sent.status_code == 202
    delivery_id = sent.get_json()["delivery_id"]
    delivery = client.get(f"/v1/deliveries/{delivery_id}", headers=auth).get_json()
    assert delivery["event_type"] == "test.ping"
    assert delivery["attempts"] == []
    with services.db.transaction() as session:
        row = session.get(Delivery, delivery_id)
        assert row is not None
        row.status = "failed"
    recovered = client.post(
        f"/v1/subscriptions/{sub['id']}/recover",
        json={"since": "2000-01-01T00:00:00Z"},
        headers=auth,
    )
    assert recovered.get_json() == {"recovered": 1}
    again = client.post(
        f"/v1/subscriptions/{sub['id']}/recover",
        json={"since": "2000-01-01T00:00:00Z"},
        headers=auth,
    )
    assert again.get_json() == {"recovered": 0}
    retried = client.post(f"/v1/deliveries/{delivery_id}/retry", headers=auth)
    assert retried.status_code == 202
    assert retried.get_json()["status"] == "pending"
    bad_since = client.post(
        f"/v1/subscriptions/{sub['id']}/recover", json={"since": "yesterday"}, headers=auth
    )
    assert bad_since.status_code == 422
    assert "since" in bad_since.get_json()["message"]
    assert client.get("/v1/deliveries/dlv_nope", headers=auth).status_code == 404
    assert client.get("/v1/deliveries?status=lost", headers=auth).status_code == 422
