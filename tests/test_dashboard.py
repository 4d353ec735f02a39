"""``/dashboard`` over HTTP: signing in, the session cookie, CSRF, and every form."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from flask.testing import FlaskClient

from service.devstack import SAMPLE_IMAGE
from service.events import add_delivery
from service.extension import Services
from service.models import DEFAULT_PROJECT_ID, Delivery, Subscription
from service.subscriptions import create_subscription
from tests.conftest import TOKEN


def csrf(client: FlaskClient, path: str = "/dashboard/login") -> str:
    page = client.get(path).get_data(as_text=True)
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, page
    return match.group(1)


@pytest.fixture
def signed_in(client: FlaskClient) -> FlaskClient:
    token = csrf(client)
    response = client.post("/dashboard/login", data={"token": TOKEN, "csrf_token": token})
    assert response.status_code == 302, response.get_data(as_text=True)
    return client


def post(client: FlaskClient, path: str, **form: object) -> tuple[int, str]:
    response = client.post(path, data={"csrf_token": csrf(client, "/dashboard/"), **form})
    return response.status_code, response.get_data(as_text=True)


def test_the_servers_address_opens_the_dashboard(client: FlaskClient) -> None:
    response = client.get("/")
    assert response.status_code == 302
    assert response.headers["Location"] == "/dashboard/"


def act(client: FlaskClient, path: str, **form: object) -> str:
    """Press a subscription action's button; return the page it redirects to."""
    status, _page = post(client, path, **form)
    assert status == 303
    return client.get("/dashboard/subscriptions").get_data(as_text=True)


def test_pages_send_strangers_to_sign_in(client: FlaskClient) -> None:
    response = client.get("/dashboard/")
    assert response.status_code == 302
    assert response.headers["Location"].endswith("/dashboard/login")
    assert client.get("/dashboard/events/stream").status_code == 401


def test_the_token_goes_in_a_post_form_never_a_url(client: FlaskClient) -> None:
    page = client.get("/dashboard/login").get_data(as_text=True)
    assert re.search(r'<form method="post" action="/dashboard/login"', page)
    assert 'type="password"' in page


def test_a_wrong_token_is_refused(client: FlaskClient) -> None:
    response = client.post("/dashboard/login", data={"token": "nope", "csrf_token": csrf(client)})
    assert response.status_code == 401
    assert "not valid" in response.get_data(as_text=True)


def test_forms_without_the_csrf_token_are_refused(client: FlaskClient) -> None:
    response = client.post("/dashboard/login", data={"token": TOKEN})
    assert response.status_code == 400
    assert "CSRF" in response.json["message"]


def test_session_cookie_is_httponly_strict_and_holds_no_token(client: FlaskClient) -> None:
    response = client.post("/dashboard/login", data={"token": TOKEN, "csrf_token": csrf(client)})
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert "Path=/dashboard" in cookie
    assert TOKEN not in cookie


def test_a_token_that_is_no_longer_configured_signs_the_browser_out(
    signed_in: FlaskClient, services: Services
) -> None:
    assert signed_in.get("/dashboard/").status_code == 200
    services.settings = replace(services.settings, api_tokens=("another-token",))
    assert signed_in.get("/dashboard/").status_code == 302


def test_uploading_an_image_creates_a_job_and_shows_it(signed_in: FlaskClient) -> None:
    with SAMPLE_IMAGE.open("rb") as image:
        response = signed_in.post(
            "/dashboard/jobs",
            data={
                "csrf_token": csrf(signed_in, "/dashboard/"),
                "image": (image, "sample.png"),
                "prompt": "a slow zoom",
                "num_frames": "8",
            },
            content_type="multipart/form-data",
        )
    assert response.status_code == 302
    page = signed_in.get(response.headers["Location"]).get_data(as_text=True)
    assert "a slow zoom" in page and "<video" in page and 'id="timeline"' in page
    assert "job_" in signed_in.get("/dashboard/").get_data(as_text=True)


def test_a_bad_upload_is_explained_not_a_500(signed_in: FlaskClient) -> None:
    status, page = post(signed_in, "/dashboard/jobs", prompt="x", num_frames="99")
    assert status == 422
    assert "num_frames" in page


def create_webhook(client: FlaskClient, services: Services) -> tuple[str, str]:
    """Create a loopback webhook subscription through the form; return its id and page."""
    services.settings = replace(services.settings, allow_private_targets=True)
    status, page = post(
        client, "/dashboard/subscriptions", kind="webhook", url="http://127.0.0.1:9/h"
    )
    assert status == 201
    match = re.search(r'data-subscription="(sub_[a-z0-9]+)"', page)
    assert match
    return match.group(1), page


def test_subscriptions_can_be_created_tested_rotated_toggled_and_recovered(
    signed_in: FlaskClient, services: Services
) -> None:
    sub_id, page = create_webhook(signed_in, services)
    secret = re.search(r'id="secret">(whsec_[^<]+)<', page)
    assert secret
    listing = signed_in.get("/dashboard/subscriptions").get_data(as_text=True)
    assert secret.group(1) not in listing  # shown once
    base = f"/dashboard/subscriptions/{sub_id}"
    assert "test.ping queued" in act(signed_in, f"{base}/test")
    status, page = post(signed_in, f"{base}/rotate")
    rotated = re.search(r'id="secret">(whsec_[^<]+)<', page)
    assert status == 200 and rotated and rotated.group(1) != secret.group(1)
    assert "Subscription disabled." in act(signed_in, f"{base}/enabled", enabled="0")
    assert "enable it first" in act(signed_in, f"{base}/recover", since="2026-01-01T00:00")
    act(signed_in, f"{base}/enabled", enabled="1")
    page = act(signed_in, f"{base}/recover", since="2026-01-01T00:00")
    assert "failed deliveries queued again" in page
    assert "since: give a date and time" in act(signed_in, f"{base}/recover", since="soon")


def test_an_action_redirects_so_reloading_does_not_repeat_it(
    signed_in: FlaskClient, services: Services
) -> None:
    sub_id, _page = create_webhook(signed_in, services)
    act(signed_in, f"/dashboard/subscriptions/{sub_id}/test")
    reloaded = signed_in.get("/dashboard/subscriptions").get_data(as_text=True)
    assert "test.ping queued" not in reloaded  # the notice was shown once
    with services.db.transaction() as session:
        assert session.query(Delivery).count() == 1


def test_a_private_subscription_url_is_refused_with_the_reason(signed_in: FlaskClient) -> None:
    status, page = post(
        signed_in, "/dashboard/subscriptions", kind="webhook", url="http://10.0.0.1/"
    )
    assert status == 422
    assert "url" in page.lower()


def failed_delivery(client: FlaskClient, services: Services) -> str:
    """A test ping to a new subscription, marked failed; return the delivery's id."""
    sub_id, _page = create_webhook(client, services)
    post(client, f"/dashboard/subscriptions/{sub_id}/test")
    with services.db.transaction() as session:
        delivery = session.query(Delivery).one()
        delivery.status = "failed"
        delivery_id: str = delivery.id
    return delivery_id


def test_a_delivery_shows_its_attempts_and_can_be_retried(
    signed_in: FlaskClient, services: Services
) -> None:
    delivery_id = failed_delivery(signed_in, services)
    page = signed_in.get(f"/dashboard/deliveries/{delivery_id}").get_data(as_text=True)
    assert 'id="retry"' in page and 'id="attempts"' in page
    status, _page = post(signed_in, f"/dashboard/deliveries/{delivery_id}/retry")
    assert status == 302
    polled = signed_in.get(f"/dashboard/deliveries/{delivery_id}?format=json").json
    assert polled["status"] == "pending"
    assert delivery_id in signed_in.get("/dashboard/deliveries").get_data(as_text=True)


def test_the_deliveries_table_refreshes_alone_and_offers_retry_on_failed_ones(
    signed_in: FlaskClient, services: Services
) -> None:
    delivery_id = failed_delivery(signed_in, services)
    table = signed_in.get("/dashboard/deliveries/table").get_data(as_text=True)
    assert table.startswith("<table") and delivery_id in table
    assert f'action="/dashboard/deliveries/{delivery_id}/retry"' in table
    other_job = signed_in.get("/dashboard/deliveries/table?job_id=job_none").get_data(as_text=True)
    assert delivery_id not in other_job and "No deliveries." in other_job


def test_a_delivery_without_an_event_is_shown_as_the_queue_position_edit(
    signed_in: FlaskClient, services: Services
) -> None:
    with services.db.transaction() as session:
        delivery = add_delivery(
            session,
            None,
            project_id=DEFAULT_PROJECT_ID,
            kind="discord_reply",
            subscription_id=None,
            target_url=None,
            job_id="job_waiting",
        )
        delivery_id = delivery.id
    table = signed_in.get("/dashboard/deliveries/table").get_data(as_text=True)
    assert delivery_id in table and "queue position" in table and "None" not in table
    page = signed_in.get(f"/dashboard/deliveries/{delivery_id}")
    assert page.status_code == 200
    assert "the edit that shows the queue position" in page.get_data(as_text=True)


def test_the_live_streams_resume_after_last_event_id_and_know_only_the_projects_jobs(
    signed_in: FlaskClient,
) -> None:
    # The browser's EventSource sends Last-Event-ID when it reconnects: it is honoured.
    resumed = signed_in.get("/dashboard/events/stream", headers={"Last-Event-ID": "evt_nope"})
    assert resumed.status_code == 422
    assert "Last-Event-ID" in resumed.json["message"]
    assert signed_in.get("/dashboard/jobs/job_nope/stream").status_code == 404


def test_a_broker_subscription_is_created_with_its_secret_and_can_rotate_it(
    signed_in: FlaskClient, services: Services
) -> None:
    services.settings = replace(services.settings, allow_private_targets=True)
    status, page = post(
        signed_in,
        "/dashboard/subscriptions",
        kind="redis",
        url="redis://127.0.0.1:6379/0?stream=motionhook",
    )
    assert status == 201, page
    assert re.search(r'id="secret">whsec_', page)
    sub_id = re.search(r'data-subscription="(sub_[a-z0-9]+)"', page)
    assert sub_id
    status, page = post(signed_in, f"/dashboard/subscriptions/{sub_id.group(1)}/rotate")
    assert status == 200 and re.search(r'id="secret">whsec_', page)


def test_a_chat_subscription_url_is_never_shown_whole(
    signed_in: FlaskClient, services: Services
) -> None:
    url = "https://hooks.slack.com/services/T0AAAAAAA/B0BBBBBBB/credentialpart123456"
    with services.db.transaction() as session:
        params = {"kind": "slack", "url": url, "events": ["job.completed"], "description": ""}
        create_subscription(session, DEFAULT_PROJECT_ID, params, limit=10)
    page = signed_in.get("/dashboard/subscriptions").get_data(as_text=True)
    assert "hooks.slack.com" in page
    assert "credentialpart123456" not in page
    assert 'id="secret"' not in page


def test_a_form_posted_again_by_a_reload_creates_or_rotates_nothing_more(
    signed_in: FlaskClient, services: Services
) -> None:
    services.settings = replace(services.settings, allow_private_targets=True)
    form = {"kind": "webhook", "url": "http://127.0.0.1:9/h", "form_id": "form-1"}
    status, page = post(signed_in, "/dashboard/subscriptions", **form)
    assert status == 201
    sub_id = re.search(r'data-subscription="(sub_[a-z0-9]+)"', page)
    assert sub_id
    status, _page = post(signed_in, "/dashboard/subscriptions", **form)
    assert status == 303
    assert "sent already" in signed_in.get("/dashboard/subscriptions").get_data(as_text=True)
    rotate = f"/dashboard/subscriptions/{sub_id.group(1)}/rotate"
    status, page = post(signed_in, rotate, form_id="form-2")
    assert status == 200
    with services.db.transaction() as session:
        assert session.query(Subscription).count() == 1
        secret = session.query(Subscription).one().secret
    assert post(signed_in, rotate, form_id="form-2")[0] == 303
    with services.db.transaction() as session:
        assert session.query(Subscription).one().secret == secret
