"""Take the README's dashboard screenshots against a real local stack: ``make screenshots``.

Starts the simulator, web and worker in a temporary folder, makes a few jobs and
deliveries (one receiver that answers 200, one that refuses), then photographs
the dashboard in Debian's Chromium and writes the PNGs to ``docs/images``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from service.devstack import ROOT, Stack, wait_until
from tests.sinks import Sink

CHROMIUM = "/usr/bin/chromium"
IMAGES = ROOT / "docs" / "images"
PROMPTS = ("a slow zoom over the hills", "the clouds drift")
WAIT_S = 60


def make_history(stack: Stack, receiver: Sink, refuser: Sink) -> tuple[str, str]:
    """Two completed jobs delivered to ``receiver``, one ping refused; return job and delivery."""
    api = stack.api()
    targets = (
        (receiver.url, ["job.completed"], "my receiver"),
        (refuser.url, ["test.ping"], "a receiver that refuses"),
    )
    for url, events, description in targets:
        body = {"kind": "webhook", "url": url, "events": events, "description": description}
        api.post(f"{stack.web_url}/v1/subscriptions", json=body, timeout=10).raise_for_status()
    job_ids = []
    for prompt in PROMPTS:
        body = {"init_image": f"{stack.web_url}/static/sample.png", "prompt": prompt}
        answer = api.post(f"{stack.web_url}/v1/jobs", json=body, timeout=10)
        answer.raise_for_status()
        job_ids.append(answer.json()["id"])
    refusing = api.get(f"{stack.web_url}/v1/subscriptions", timeout=10).json()["items"]
    refusing_id = next(sub["id"] for sub in refusing if sub["url"] == refuser.url)
    sent = api.post(f"{stack.web_url}/v1/subscriptions/{refusing_id}/test", timeout=10).json()

    def settled() -> bool:
        deliveries = api.get(f"{stack.web_url}/v1/deliveries", timeout=10).json()["items"]
        return len(deliveries) == 3 and all(d["status"] != "pending" for d in deliveries)

    wait_until(settled, timeout=WAIT_S, message="every delivery settled")
    return job_ids[-1], sent["delivery_id"]


def photograph(page: Page, stack: Stack, job_id: str, delivery_id: str) -> None:
    dashboard = f"{stack.web_url}/dashboard"
    page.goto(f"{dashboard}/")
    page.fill("#token", stack.token)
    page.click("button[type=submit]")
    page.wait_for_selector("table#jobs")
    page.screenshot(path=IMAGES / "dashboard-jobs.png")
    page.goto(f"{dashboard}/jobs/{job_id}")
    page.wait_for_function("() => document.getElementById('video').currentTime > 0.5")
    page.screenshot(path=IMAGES / "dashboard-job.png", full_page=True)
    page.goto(f"{dashboard}/deliveries")
    page.screenshot(path=IMAGES / "dashboard-deliveries.png")
    page.goto(f"{dashboard}/deliveries/{delivery_id}")
    page.screenshot(path=IMAGES / "dashboard-delivery.png")
    page.goto(f"{dashboard}/subscriptions")
    page.screenshot(path=IMAGES / "dashboard-subscriptions.png", full_page=True)


def main() -> int:
    receiver = Sink()
    refuser = Sink(lambda _n, _r: (400, {}, b"unknown event"))
    with tempfile.TemporaryDirectory() as folder:
        stack = Stack(Path(folder), env={"MOTIONHOOK_DATABASE_URL": f"sqlite:///{folder}/db"})
        try:
            stack.start_all()
            job_id, delivery_id = make_history(stack, receiver, refuser)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM)
                page = browser.new_page(viewport={"width": 1200, "height": 760})
                page.set_default_timeout(WAIT_S * 1000)
                photograph(page, stack, job_id, delivery_id)
                browser.close()
        finally:
            stack.stop()
            receiver.close()
            refuser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
