"""The dashboard and /docs in a real browser: Playwright driving Debian's Chromium.

Playwright cannot download its own browsers here; ``.ci/run`` installs Debian's
``chromium``. Without it (or without playwright) these tests skip and say why.
Every page runs with the network limited to the stack on 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest
import requests
from standardwebhooks import Webhook

from service.devstack import SAMPLE_IMAGE, Stack
from tests.conftest import eventually
from tests.sinks import Sink

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Route

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-background-networking"]
WAIT_MS = 30_000

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        shutil.which(CHROMIUM) is None,
        reason=f"{CHROMIUM} not found: `apt-get install -y chromium` (.ci/run does)",
    ),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def blocked() -> list[str]:
    """Every URL a page tried outside 127.0.0.1."""
    return []


@pytest.fixture
def page(browser: Browser, blocked: list[str]) -> Iterator[Page]:
    """A fresh page whose requests may only go to 127.0.0.1 (everything else is aborted)."""
    context = browser.new_context()

    def only_loopback(route: Route) -> None:
        url = route.request.url
        if urlsplit(url).hostname == "127.0.0.1" or url.startswith("data:"):
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    context.route("**/*", only_loopback)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    yield page
    context.close()


@pytest.fixture
def stack(make_stack: Callable[..., Stack]) -> Iterator[Stack]:
    stack = make_stack()
    stack.start_all()
    yield stack


def sign_in(page: Page, stack: Stack) -> None:
    page.goto(f"{stack.web_url}/dashboard/")
    page.fill("#token", stack.token)
    page.click("button[type=submit]")
    page.wait_for_selector("table#jobs")


def test_upload_watch_the_job_complete_live_and_play_the_video(
    page: Page, stack: Stack, blocked: list[str]
) -> None:
    # The receiver holds its answer until told, so the page shows the delivery pending first.
    answer = threading.Event()
    sink = Sink(lambda _n, _r: (200, {}, b"ok") if answer.wait(WAIT_MS / 1000) else None)
    try:
        body = {"kind": "webhook", "url": sink.url, "events": ["job.completed"]}
        created = stack.api().post(f"{stack.web_url}/v1/subscriptions", json=body, timeout=10)
        assert created.status_code == 201, created.text
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        sign_in(page, stack)
        cookie = page.context.cookies()[0]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        page.set_input_files("input[name=image]", str(SAMPLE_IMAGE))
        page.fill("input[name=prompt]", "a slow zoom")
        page.click("form[enctype] button[type=submit]")
        page.wait_for_selector("h1 [data-status]")
        landed = page.url
        page.evaluate("window.__notReloaded = true")
        page.wait_for_function("() => document.getElementById('input-image').naturalWidth > 0")
        page.wait_for_selector("h1 .status-completed")
        page.wait_for_function("() => document.getElementById('video').readyState >= 2")
        # Playing: muted autoplay, the clock moves.
        page.wait_for_function("() => document.getElementById('video').currentTime > 0")
        page.wait_for_selector("#deliveries tr[data-delivery] .status-pending")
        answer.set()
        page.wait_for_selector("#deliveries tr[data-delivery] .status-delivered")
        assert page.evaluate("window.__notReloaded") is True
        assert page.url == landed
        timeline = page.inner_text("#timeline")
        assert "job.processing" in timeline and "job.completed" in timeline
        assert "job.completed" in page.inner_text("#deliveries")
        assert requested and not [url for url in requested if stack.token in url]
        assert blocked == []
    finally:
        answer.set()
        sink.close()


def test_the_jobs_page_shows_a_job_made_elsewhere_reach_completed_without_reloading(
    page: Page, stack: Stack
) -> None:
    sign_in(page, stack)
    page.evaluate("window.__notReloaded = true")
    body = {"init_image": f"{stack.web_url}/static/sample.png", "prompt": "made by curl"}
    created = stack.api().post(f"{stack.web_url}/v1/jobs", json=body, timeout=10)
    assert created.status_code == 202, created.text
    row = f"#jobs tr[data-job='{created.json()['id']}']"
    page.wait_for_selector(f"{row} .status-completed")
    assert "made by curl" in page.inner_text(row)
    assert page.evaluate("window.__notReloaded") is True


def test_a_failed_delivery_turns_delivered_with_the_retry_button(page: Page, stack: Stack) -> None:
    # A 400 fails the delivery for good (no automatic retry): only the button sends it again.
    sink = Sink(lambda n, _r: (400, {}, b"not yet") if n == 1 else (200, {}, b"ok"))
    try:
        api = stack.api()
        body = {"kind": "webhook", "url": sink.url, "events": ["job.completed"]}
        sub = api.post(f"{stack.web_url}/v1/subscriptions", json=body, timeout=10).json()
        sent = api.post(f"{stack.web_url}/v1/subscriptions/{sub['id']}/test", timeout=10).json()
        delivery_url = f"{stack.web_url}/v1/deliveries/{sent['delivery_id']}"
        eventually(
            stack,
            lambda: api.get(delivery_url, timeout=10).json()["status"] == "failed",
            "the first attempt to fail",
        )
        sign_in(page, stack)
        page.goto(f"{stack.web_url}/dashboard/deliveries")
        page.click(f"a:text('{sent['delivery_id']}')")
        page.wait_for_selector("h1 .status-failed")
        page.click("#retry")
        page.wait_for_selector("h1 .status-delivered")
        assert page.locator("#attempts tbody tr").count() == 2
        assert len(sink.received) == 2
    finally:
        sink.close()


def test_a_subscription_is_created_pinged_rotated_toggled_and_recovered(
    page: Page, stack: Stack
) -> None:
    # The first ping is refused for good (400), so "recover" has a failed delivery to replay.
    sink = Sink(lambda n, _r: (400, {}, b"no") if n == 1 else (200, {}, b"ok"))
    try:
        sign_in(page, stack)
        page.goto(f"{stack.web_url}/dashboard/subscriptions")
        page.select_option("select[name=kind]", "webhook")
        page.fill("input[name=url]", sink.url)
        page.click("form.card button[type=submit]")
        secret = page.inner_text("#secret")
        assert secret.startswith("whsec_")
        page.reload()  # posts the form again: nothing is created twice, no secret shown
        assert "sent already" in page.inner_text("[role=status]")
        assert secret not in page.content()  # shown once
        row = page.locator("#subscriptions tr[data-subscription]")
        assert row.count() == 1
        row.locator("button:text('Send test')").click()
        assert "test.ping queued" in page.inner_text("[role=status]")
        eventually(stack, lambda: sink.received, "the test ping")
        ping = sink.received[0]
        assert Webhook(secret).verify(ping.body, ping.headers)["type"] == "test.ping"

        row.locator("button:text('Rotate secret')").click()
        rotated = page.inner_text("#secret")
        assert rotated.startswith("whsec_") and rotated != secret
        row.locator("button:text('Disable')").click()
        assert "disabled" in row.inner_text()
        row.locator("button:text('Send test')").click()
        assert "enable it first" in page.inner_text("[role=alert]")
        row.locator("button:text('Enable')").click()
        assert "enabled" in row.inner_text()

        an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
        row.locator("input[name=since]").fill(an_hour_ago.strftime("%Y-%m-%dT%H:%M"))
        row.locator("button:text('Recover')").click()
        assert "1 failed deliveries queued again" in page.inner_text("[role=status]")
        eventually(stack, lambda: len(sink.received) == 2, "the recovered ping")
        replayed = sink.received[1]
        assert Webhook(rotated).verify(replayed.body, replayed.headers)["type"] == "test.ping"
    finally:
        sink.close()


def test_docs_render_every_operation_with_no_network(
    page: Page, stack: Stack, blocked: list[str]
) -> None:
    spec = requests.get(f"{stack.web_url}/openapi.json", timeout=10).json()
    operations = sum(
        1 for item in spec["paths"].values() for method in item if method != "parameters"
    )
    page.goto(f"{stack.web_url}/docs")
    page.wait_for_function(f"() => document.querySelectorAll('.opblock').length >= {operations}")
    assert page.locator(".opblock").count() == operations
    assert blocked == []


def test_docs_try_it_out_submits_the_example_job_with_the_token(
    page: Page, stack: Stack, blocked: list[str]
) -> None:
    page.goto(f"{stack.web_url}/docs")
    page.click(".btn.authorize")
    page.fill(".auth-container input", stack.token)
    page.click(".auth-btn-wrapper .modal-btn.auth")
    page.click(".btn-done")
    operation = page.locator(".opblock-post", has=page.locator("[data-path='/v1/jobs']")).first
    operation.locator(".opblock-summary").click()
    operation.locator(".execute").click()
    status = operation.locator(".live-responses-table tr.response .response-col_status").first
    status.wait_for()
    assert status.inner_text().strip() == "202"
    answer = operation.locator(".live-responses-table .microlight").first.inner_text()
    job = stack.api().get(f"{stack.web_url}/v1/jobs/{json.loads(answer)['id']}", timeout=10)
    assert job.json()["input"]["prompt"] == "a slow zoom over the hills"
    assert blocked == []
