"""End to end fan-out: gunicorn ``web``, ``motionhook worker`` and real sinks over loopback.

Each scenario starts real processes with ``make_stack`` (SQLite, and PostgreSQL
when configured), subscribes local sinks from :mod:`tests.sinks` through the API,
and judges the outcome only by what the sinks received and what the deliveries
API (or, for bulk checks, the database) says. Nothing sleeps for a fixed time:
every wait polls for the state it needs.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import standardwebhooks
import svix.webhooks
from sqlalchemy import create_engine, text

from service.callbacks import callback_token
from service.db import normalize_url
from service.devstack import SAMPLE_IMAGE, Process, Stack
from tests.conftest import eventually
from tests.sinks import Answer, Received, Script, Sink

pytestmark = pytest.mark.e2e

CALLBACK_SECRET = "fanout-callback-secret"
#: Shared by every stack: a known callback secret, and few gunicorn workers to start fast.
STACK_ENV = {
    "MOTIONHOOK_CALLBACK_SECRET": CALLBACK_SECRET,
    "WEB_CONCURRENCY": "2",
    "GUNICORN_ACCESS_LOG": "0",
}
#: Retries within seconds instead of minutes.
FAST_RETRIES = {"MOTIONHOOK_RETRY_SCHEDULE": "0.2,0.5,1,2", "MOTIONHOOK_DELIVERY_TIMEOUT": "2"}
SIMULATOR_FLAGS = ("--delay", "0.2", "--eta", "1")
#: Small videos keep rendering, downloading and hashing in the milliseconds.
SMALL_VIDEO = {"width": 128, "height": 128, "num_frames": 8, "prompt": "a slow pan over a lake"}
#: A generous deadline for anything the stack should do "soon"; never a timing assertion.
WAIT = 30.0
HTTP_TIMEOUT = 10.0
OK: Answer = (200, {}, b"ok")
JSON = {"Content-Type": "application/json"}

MakeStack = Callable[..., Stack]


# -- helpers ---------------------------------------------------------------------------


def workers(stack: Stack) -> list[Process]:
    return [process for process in stack.processes if process.name == "worker"]


def query(stack: Stack, sql: str, **params: Any) -> list[Any]:
    """Run one read-only SQL statement against the stack's database."""
    engine = create_engine(normalize_url(stack.env["MOTIONHOOK_DATABASE_URL"]))
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql), params))
    finally:
        engine.dispose()


class Api:
    """The public HTTP API of one stack, with its bearer token."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.session = stack.api()

    def call(self, method: str, path: str, expect: int, **kwargs: Any) -> Any:
        response = self.session.request(
            method, f"{self.stack.web_url}{path}", timeout=HTTP_TIMEOUT, **kwargs
        )
        assert response.status_code == expect, f"{method} {path}: {response.text}"
        return response.json() if response.content else None

    def subscribe(self, kind: str, url: str, events: list[str] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": kind, "url": url, "description": f"e2e {kind}"}
        if events is not None:
            body["events"] = events
        sub: dict[str, Any] = self.call("POST", "/v1/subscriptions", 201, json=body)
        return sub

    def ping(self, subscription_id: str) -> dict[str, Any]:
        """Send a ``test.ping``; return ``{"event_id", "delivery_id"}``."""
        sent: dict[str, Any] = self.call("POST", f"/v1/subscriptions/{subscription_id}/test", 202)
        return sent

    def delivery(self, delivery_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self.call("GET", f"/v1/deliveries/{delivery_id}", 200)
        return found

    def deliveries(self, **filters: str) -> list[dict[str, Any]]:
        """Every delivery matching ``filters``, across all pages."""
        items: list[dict[str, Any]] = []
        params: dict[str, str | int] = {**filters, "limit": 200}
        while True:
            page = self.call("GET", "/v1/deliveries", 200, params=params)
            items += page["items"]
            if not page["next_cursor"]:
                return items
            params["cursor"] = page["next_cursor"]

    def job(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self.call("GET", f"/v1/jobs/{job_id}", 200)
        return job


def all_delivered(api: Api, count: int, **filters: str) -> list[dict[str, Any]] | None:
    """The deliveries matching ``filters`` once there are ``count`` and all are delivered."""
    items = api.deliveries(**filters)
    if len(items) == count and all(item["status"] == "delivered" for item in items):
        return items
    return None


def all_settled(api: Api, delivery_ids: list[str], status: str) -> list[dict[str, Any]] | None:
    found = [api.delivery(delivery_id) for delivery_id in delivery_ids]
    return found if all(item["status"] == status for item in found) else None


def webhook_ids(received: list[Received]) -> list[str]:
    return [request.headers["webhook-id"] for request in received]


def verify_webhook(secret: str, request: Received) -> dict[str, Any]:
    """Check the Standard Webhooks signature with both reference libraries; return the body."""
    svix.webhooks.Webhook(secret).verify(request.body, request.headers)
    event: dict[str, Any] = standardwebhooks.Webhook(secret).verify(request.body, request.headers)
    assert request.headers["webhook-id"] == event["id"]
    return event


def accepted(upstream_id: int) -> dict[str, Any]:
    """ModelsLab's answer to a submit it accepted and will call back about in an hour."""
    return {"status": "processing", "id": upstream_id, "eta": 3600, "future_links": []}


def slack_buttons(payload: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        element
        for block in payload["blocks"]
        if block["type"] == "actions"
        for element in block["elements"]
        if element["type"] == "button"
    ]


def assert_discord_limits(payload: dict[str, Any]) -> None:
    """Discord's documented execute-webhook limits (content, embed fields, embed total)."""
    assert len(payload["content"]) <= 2000
    (embed,) = payload["embeds"]
    fields = embed.get("fields", [])
    assert len(fields) <= 25
    assert len(embed["title"]) <= 256
    assert len(embed.get("description", "")) <= 4096
    assert len(embed["footer"]["text"]) <= 2048
    for item in fields:
        assert 0 < len(item["name"]) <= 256
        assert 0 < len(item["value"]) <= 1024
    total = len(embed["title"]) + len(embed.get("description", ""))
    total += len(embed["footer"]["text"]) + sum(len(f["name"]) + len(f["value"]) for f in fields)
    assert total <= 6000
    assert payload["allowed_mentions"] == {"parse": []}


@pytest.fixture
def sinks() -> Iterator[Callable[..., Sink]]:
    """Make scripted sinks (``OK`` by default); all are closed at teardown."""
    made: list[Sink] = []

    def make(script: Script | None = None) -> Sink:
        sink = Sink(script) if script else Sink()
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close()


@pytest.fixture
def start(make_stack: MakeStack) -> Iterator[Callable[..., Api]]:
    """Start a stack: migrate, then web and ``workers`` workers (and the simulator if asked).

    Returns the stack's API client. At teardown clients are closed, so no idle keep-alive
    connection holds up gunicorn's graceful shutdown, and all processes stop in parallel.
    """
    clients: list[Api] = []

    def start_stack(*, simulator: bool = False, workers: int = 1, **env: str) -> Api:
        stack = make_stack(**{**STACK_ENV, **env})
        stack.migrate()
        if simulator:
            stack.start_simulator(*SIMULATOR_FLAGS)
        stack.start_web()
        for _ in range(workers):
            stack.start_worker()
        api = Api(stack)
        clients.append(api)
        return api

    yield start_stack
    for api in clients:
        api.session.close()
        # Ask every process to stop at once; make_stack then waits for each in turn.
        for process in api.stack.processes:
            process.signal(signal.SIGTERM)


# -- scenarios -------------------------------------------------------------------------


def test_completed_job_reaches_slack_discord_and_webhook_exactly_once(
    start: Callable[..., Api], sinks: Callable[..., Sink]
) -> None:
    api = start(simulator=True)
    stack = api.stack
    slack, discord, hook = sinks(), sinks(lambda _n, _r: (204, {}, b"")), sinks()
    subs = {
        "slack": api.subscribe("slack", slack.url, ["job.completed"]),
        "discord": api.subscribe("discord", discord.url, ["job.completed"]),
        "webhook": api.subscribe("webhook", hook.url, ["job.completed"]),
    }
    with SAMPLE_IMAGE.open("rb") as image:
        created = api.call(
            "POST",
            "/v1/jobs",
            202,
            files={"image": ("sample.png", image, "image/png")},
            data={k: str(v) for k, v in SMALL_VIDEO.items()},
        )
    job_id = created["id"]

    for sink in (slack, discord, hook):
        sink.wait_for(1, timeout=WAIT)
    # Everything that could cause a second message has run its course: every delivery of
    # the job is settled, and the simulator sent its one callback and nothing else.
    settled = eventually(
        stack, lambda: all_delivered(api, 3, job_id=job_id), "the job's 3 deliveries"
    )
    stats = requests.get(f"{stack.sim_url}/_sim/stats", timeout=HTTP_TIMEOUT).json()
    assert stats["jobs"] == {"success": 1}
    assert (stats["callbacks_sent"], stats["callbacks_failed"]) == (1, 0)
    job = api.job(job_id)
    assert job["status"] == "completed"

    assert [len(sink.received) for sink in (slack, discord, hook)] == [1, 1, 1]
    assert sorted(d["subscription_id"] for d in settled) == sorted(s["id"] for s in subs.values())
    assert {(d["event_type"], d["attempt_count"]) for d in settled} == {("job.completed", 1)}
    (event_id,) = {d["event_id"] for d in settled}  # one event, fanned out three ways

    event = verify_webhook(subs["webhook"]["secret"], hook.received[0])
    assert event["id"] == event_id
    assert event["type"] == "job.completed"
    assert event["data"]["id"] == job_id
    video_url = event["data"]["outputs"][0]["url"]
    assert urlsplit(video_url).path == urlsplit(job["outputs"][0]["url"]).path
    video = requests.get(video_url, timeout=HTTP_TIMEOUT)
    assert video.status_code == 200
    assert video.headers["Content-Type"] == "video/mp4"
    assert len(video.content) == job["outputs"][0]["bytes"]

    slack_body = json.loads(slack.received[0].body)
    assert slack_body["text"].startswith("Video ready")
    assert slack_body["blocks"][0]["type"] == "header"
    (button,) = slack_buttons(slack_body)
    assert button["url"] == video_url

    discord_body = json.loads(discord.received[0].body)
    assert video_url in discord_body["content"]
    assert_discord_limits(discord_body)
    assert discord_body["embeds"][0]["url"] == video_url
    assert event_id in discord_body["embeds"][0]["footer"]["text"]


def test_three_workers_deliver_every_event_of_500_jobs_exactly_once(
    start: Callable[..., Api], stack_database_url: str, sinks: Callable[..., Sink]
) -> None:
    if stack_database_url.startswith("sqlite"):
        pytest.skip("several workers need PostgreSQL (SKIP LOCKED claims); SQLite has one writer")
    jobs, early = 500, 400
    # No simulator: a stub "ModelsLab" accepts every submit as processing (not due for
    # reconciliation for an hour), and the test reports each job's failure through its
    # signed callback URL. Most jobs fail before the workers start, so three workers race
    # for a backlog; the rest fail while they run, so new deliveries wake them too.
    upstream = sinks(lambda number, _r: (200, JSON, json.dumps(accepted(number)).encode()))
    api = start(
        workers=0,
        MOTIONHOOK_MODELSLAB_BASE_URL=upstream.url.removesuffix("/hook") + "/api/v6",
        # Successful attempts are logged at DEBUG; the end checks each worker sent some.
        MOTIONHOOK_LOG_LEVEL="DEBUG",
        # The stub never finishes a job: with ModelsLab's cap only five would be submitted.
        MOTIONHOOK_MODELSLAB_MAX_QUEUED="0",
        **FAST_RETRIES,
    )
    stack = api.stack
    first, second = sinks(), sinks()
    secrets = [
        api.subscribe("webhook", sink.url, ["job.failed"])["secret"] for sink in (first, second)
    ]
    local = threading.local()
    sessions: list[requests.Session] = []

    def session() -> requests.Session:
        if not hasattr(local, "session"):
            local.session = stack.api()
            sessions.append(local.session)
        return local.session  # type: ignore[no-any-return]

    def create(_: int) -> str:
        body = {"init_image": "https://example.com/in.png", **SMALL_VIDEO}
        response = session().post(f"{stack.web_url}/v1/jobs", json=body, timeout=HTTP_TIMEOUT)
        assert response.status_code == 202, response.text
        job_id: str = response.json()["id"]
        return job_id

    def fail(numbered: tuple[int, str]) -> None:
        number, job_id = numbered
        token = callback_token(CALLBACK_SECRET, job_id)
        response = session().post(
            f"{stack.web_url}/v1/callbacks/modelslab/{job_id}?sig={token}",
            json={"status": "failed", "message": "x", "id": number},
            timeout=HTTP_TIMEOUT,
        )
        assert response.status_code == 200, response.text

    with ThreadPoolExecutor(8) as pool:
        job_ids = list(pool.map(create, range(jobs)))
        failures = list(enumerate(job_ids, start=1))
        list(pool.map(fail, failures[:early]))
        for _ in range(3):
            stack.start_worker()
        eventually(
            stack,
            lambda: all("worker started" in process.log() for process in workers(stack)),
            "three workers to start",
        )
        list(pool.map(fail, failures[early:]))
    for opened in sessions:
        opened.close()

    for sink in (first, second):
        sink.wait_for(jobs, timeout=60)

    def settled() -> dict[str, int] | None:
        rows = query(stack, "SELECT status, count(*) AS n FROM deliveries GROUP BY status")
        counts = {row.status: row.n for row in rows}
        return counts if counts == {"delivered": 2 * jobs} else None

    eventually(stack, settled, f"{2 * jobs} deliveries to be delivered")
    (attempts,) = query(stack, "SELECT count(*) AS n FROM delivery_attempts")
    assert attempts.n == 2 * jobs  # no delivery was sent twice
    events = query(stack, "SELECT id, job_id FROM events WHERE type = 'job.failed'")
    assert sorted(row.job_id for row in events) == sorted(job_ids)
    event_ids = {row.id for row in events}
    for sink, secret in zip((first, second), secrets, strict=True):
        per_id = Counter(webhook_ids(sink.received))
        assert set(per_id) == event_ids
        assert set(per_id.values()) == {1}, per_id.most_common(3)
        bodies = [verify_webhook(secret, request) for request in sink.received]
        assert {body["data"]["id"] for body in bodies} == set(job_ids)
    assert len(api.deliveries(status="delivered")) == 2 * jobs
    # The load really was shared: every worker is alive and logged deliveries of its own.
    for process in workers(stack):
        assert process.popen.poll() is None, process.log()[-3000:]
        assert '"delivery_id": "dlv_' in process.log(), f"{process.name} delivered nothing"


def test_delivery_survives_a_worker_killed_mid_request(
    start: Callable[..., Api], sinks: Callable[..., Sink]
) -> None:
    api = start(
        MOTIONHOOK_RETRY_SCHEDULE="0.2,0.5,1,2",
        MOTIONHOOK_DELIVERY_TIMEOUT="3",
        MOTIONHOOK_DELIVERY_LEASE="4",
    )
    stack = api.stack
    answering = threading.Event()
    sink = sinks(lambda _n, _r: OK if answering.is_set() else None)  # hangs until answering
    sub = api.subscribe("webhook", sink.url)
    sent = api.ping(sub["id"])

    sink.wait_for(1, timeout=WAIT)  # the worker is now waiting for the answer
    (worker,) = workers(stack)
    worker.signal(signal.SIGKILL)
    assert worker.popen.wait(10) == -signal.SIGKILL
    answering.set()
    sink.release.set()
    stack.start_worker()

    sink.wait_for(2, timeout=WAIT)  # after the dead worker's lease ran out
    delivery = eventually(
        stack, lambda: all_settled(api, [sent["delivery_id"]], "delivered"), "redelivery"
    )[0]
    assert webhook_ids(sink.received) == [sent["event_id"]] * 2
    for request in sink.received:
        verify_webhook(sub["secret"], request)
    # The killed attempt never finished, so only the successful one is on record.
    assert delivery["attempt_count"] == 1
    assert [a["status_code"] for a in delivery["attempts"]] == [200]


def test_events_sent_while_the_sink_was_down_arrive_once_it_is_back(
    start: Callable[..., Api], sinks: Callable[..., Sink]
) -> None:
    # One step more than FAST_RETRIES, so no delivery can run out of retries while the
    # test waits for the last one to have failed twice.
    api = start(MOTIONHOOK_RETRY_SCHEDULE="0.2,0.5,1,2,4", MOTIONHOOK_DELIVERY_TIMEOUT="2")
    stack = api.stack
    up = threading.Event()
    sink = sinks(lambda _n, _r: OK if up.is_set() else (503, {}, b"down for maintenance"))
    sub = api.subscribe("webhook", sink.url)
    sent = [api.ping(sub["id"]) for _ in range(5)]
    delivery_ids = [item["delivery_id"] for item in sent]

    def retried_while_down() -> bool:
        found = [api.delivery(delivery_id) for delivery_id in delivery_ids]
        return all(item["status"] == "pending" and item["attempt_count"] >= 2 for item in found)

    eventually(stack, retried_while_down, "two failed attempts at every delivery")
    up.set()

    delivered = eventually(
        stack, lambda: all_settled(api, delivery_ids, "delivered"), "every delivery to arrive"
    )
    received = Counter(webhook_ids(sink.received))
    assert set(received) == {item["event_id"] for item in sent}
    for request in sink.received:
        verify_webhook(sub["secret"], request)
    for item in delivered:
        outcomes = [(a["status_code"], a["outcome"]) for a in item["attempts"]]
        assert outcomes[-1] == (200, "delivered")
        assert set(outcomes[:-1]) == {(503, "retry")}
        assert len(outcomes) >= 3
        # Every attempt but the successful one reached the sink while it was down.
        assert received[item["event_id"]] == len(outcomes)


def test_recover_replays_only_the_failed_deliveries_since_a_time(
    start: Callable[..., Api], sinks: Callable[..., Sink]
) -> None:
    api = start(MOTIONHOOK_RETRY_SCHEDULE="0.1", MOTIONHOOK_DELIVERY_TIMEOUT="2")
    stack = api.stack
    healthy = threading.Event()
    sink = sinks(lambda _n, _r: OK if healthy.is_set() else (500, {}, b"broken"))
    sub = api.subscribe("webhook", sink.url)

    def pings(count: int, status: str) -> list[dict[str, Any]]:
        sent = [api.ping(sub["id"]) for _ in range(count)]
        ids = [item["delivery_id"] for item in sent]
        eventually(stack, lambda: all_settled(api, ids, status), f"{count} pings to be {status}")
        return sent

    too_old = pings(1, "failed")[0]  # fails before "since": must stay failed
    since = datetime.now(UTC)
    failed = pings(3, "failed")
    healthy.set()
    succeeded = pings(2, "delivered")
    for item in failed:
        assert api.delivery(item["delivery_id"])["attempt_count"] == 2  # one retry, then gave up
    seen = len(sink.received)

    answer = api.call(
        "POST", f"/v1/subscriptions/{sub['id']}/recover", 202, json={"since": since.isoformat()}
    )

    assert answer == {"recovered": 3}
    recovered = eventually(
        stack,
        lambda: all_settled(api, [item["delivery_id"] for item in failed], "delivered"),
        "the recovered deliveries",
    )
    assert {item["attempt_count"] for item in recovered} == {3}
    resent = webhook_ids(sink.wait_for(seen + 3)[seen:])
    assert sorted(resent) == sorted(item["event_id"] for item in failed)
    assert len(sink.received) == seen + 3
    for request in sink.received[seen:]:
        verify_webhook(sub["secret"], request)
    assert api.delivery(too_old["delivery_id"])["status"] == "failed"
    for item in succeeded:
        assert api.delivery(item["delivery_id"])["attempt_count"] == 1


def test_slack_messages_are_paced_one_per_second_and_none_is_dropped(
    start: Callable[..., Api], sinks: Callable[..., Sink]
) -> None:
    # Two workers, so the pace must hold across processes, not just within one.
    api = start(workers=2, **FAST_RETRIES)
    stack = api.stack
    arrivals: list[float] = []

    def script(_n: int, _request: Received) -> Answer:
        arrivals.append(time.monotonic())
        return OK

    sink = sinks(script)
    sub = api.subscribe("slack", sink.url)
    sent = [api.ping(sub["id"]) for _ in range(3)]

    delivered = eventually(
        stack,
        lambda: all_settled(api, [item["delivery_id"] for item in sent], "delivered"),
        "three Slack messages",
    )
    assert len(sink.received) == 3
    assert {item["attempt_count"] for item in delivered} == {1}
    texts = [json.loads(request.body)["text"] for request in sink.received]
    assert all(body.startswith("motionhook test") for body in texts)
    # Slack allows about one message per second per webhook. Each send is scheduled a full
    # second after the previous one started; the margin only absorbs scheduling jitter on
    # a busy machine (unpaced, the three would arrive milliseconds apart).
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:], strict=False)]
    assert len(gaps) == 2
    assert min(gaps) >= 0.8, gaps
