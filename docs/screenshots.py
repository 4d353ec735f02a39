"""Take the README's screenshots against a real local stack: ``make screenshots``.

Starts the simulator, web and worker in a temporary folder, makes a few jobs and
deliveries (one receiver that answers 200, one that refuses), runs ``motionhook
submit`` as a user would, then photographs the dashboard and the CLI's transcript
in Debian's Chromium and writes the PNGs to ``docs/images``.
"""

from __future__ import annotations

import html
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from service.devstack import ROOT, SAMPLE_IMAGE, Stack, wait_until
from tests.sinks import Sink

CHROMIUM = "/usr/bin/chromium"
IMAGES = ROOT / "docs" / "images"
PROMPTS = ("a slow zoom over the hills", "the clouds drift")
WAIT_S = 60
TERMINAL_COLUMNS = 100


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


def cli_transcript(stack: Stack, folder: Path) -> str:
    """Run ``motionhook submit --output`` against the stack; return what the terminal shows."""
    argv = ["submit", "sample.png", "--prompt", "a slow zoom", "--output", "zoom.mp4"]
    (folder / "sample.png").write_bytes(SAMPLE_IMAGE.read_bytes())
    env = {**stack.env, "MOTIONHOOK_URL": stack.web_url, "MOTIONHOOK_TOKEN": stack.token}
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", *argv],
        env=env,
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=True,
    )
    job = done.stdout.strip()
    shown = job if len(job) <= 2 * TERMINAL_COLUMNS else job[: 2 * TERMINAL_COLUMNS - 3] + "..."
    return f"$ motionhook {' '.join(argv)}\n{done.stderr}{shown}"


def photograph_terminal(page: Page, transcript: str) -> None:
    lines = [textwrap.fill(line, TERMINAL_COLUMNS) or " " for line in transcript.splitlines()]
    page.goto("about:blank")  # away from the dashboard's CSP, which refuses inline styles
    page.set_content(
        '<pre style="display:inline-block;margin:0;padding:16px 20px;font-size:15px;'
        'background:#1d2330;color:#e4e7ec">' + html.escape("\n".join(lines)) + "</pre>"
    )
    page.locator("pre").screenshot(path=IMAGES / "cli-submit.png")


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
            transcript = cli_transcript(stack, Path(folder))
            job_id, delivery_id = make_history(stack, receiver, refuser)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM)
                page = browser.new_page(viewport={"width": 1200, "height": 760})
                page.set_default_timeout(WAIT_S * 1000)
                photograph(page, stack, job_id, delivery_id)
                photograph_terminal(page, transcript)
                browser.close()
        finally:
            stack.stop()
            receiver.close()
            refuser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
