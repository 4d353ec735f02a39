"""Chat replies: Discord after the 15-minute token, progress texts, and Slack's result paths."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner

from service.chat.replies import (
    discord_reply_target,
    queued_envelope,
    send_reply,
    slack_reply_target,
)
from service.cli import main
from service.events import add_delivery, new_event
from service.extension import Services
from service.jobs import create_job
from service.models import DeliveryAttempt, Job, JobStatus, utcnow
from service.notifiers.policy import AttemptResult
from service.outbound import make_session
from tests.local_http import Answer, LocalServer, Received, Responder
from tests.test_chat_slack import BOT_TOKEN, api_params, fake_slack


def later() -> datetime:
    """Sixteen minutes from now: past the 15-minute life of an interaction token."""
    return datetime.now(UTC) + timedelta(minutes=16)


@pytest.fixture
def api() -> Iterator[LocalServer]:
    with LocalServer() as server:
        yield server


def chat_job(services: Services) -> dict[str, Any]:
    """A completed Discord job; its ``job.completed`` envelope."""
    with services.db.transaction() as session:
        job = create_job(session, services.db, {"prompt": "p"}, project_id="prj_default")
        job.chat_reply = discord_reply_target("app1", "tok", "c1")
        job.status = JobStatus.COMPLETED
        data = {"id": job.id, "status": "completed", "model_id": "wan2.2", "outputs": []}
    return {"id": "evt_1", "type": "job.completed", "data": data}


def services_with(services: Services, api: LocalServer, **changes: Any) -> Services:
    settings = replace(services.settings, discord_api_url=api.url + "/api", **changes)
    return replace(services, settings=settings)


def test_expired_token_posts_the_result_to_the_channel_with_the_bot_token(
    services: Services,
    api: LocalServer,
) -> None:
    configured = services_with(services, api, discord_bot_token="bot-secret")
    http = make_session(allow_private=True)
    result = send_reply(configured, http, chat_job(services), now=later())
    assert result.outcome.result == "delivered"
    [request] = api.received
    assert (request.method, request.path) == ("POST", "/api/channels/c1/messages")
    assert request.headers["authorization"] == "Bot bot-secret"
    assert json.loads(request.body)["allowed_mentions"] == {"parse": []}


def test_expired_token_without_bot_token_fails_naming_the_setting(
    services: Services, api: LocalServer
) -> None:
    configured = services_with(services, api, discord_bot_token=None)
    http = make_session(allow_private=True)
    result = send_reply(configured, http, chat_job(services), now=later())
    assert result.outcome.result == "permanent"
    assert "MOTIONHOOK_DISCORD_BOT_TOKEN" in result.outcome.reason
    assert api.received == []


def test_register_commands_puts_animate_with_the_bot_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def respond(request: Received) -> Answer:
        return 200, {"Content-Type": "application/json"}, request.body

    monkeypatch.setenv("MOTIONHOOK_INSTANCE_PATH", str(tmp_path))
    with LocalServer(respond) as discord:
        env = {
            "MOTIONHOOK_DISCORD_API_URL": discord.url + "/api",
            "MOTIONHOOK_DISCORD_APPLICATION_ID": "app1",
            "MOTIONHOOK_DISCORD_BOT_TOKEN": "bot-secret",
            "MOTIONHOOK_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
        }
        outcome = CliRunner().invoke(
            main, ["discord", "register-commands", "--guild", "g1"], env=env
        )
    assert outcome.exit_code == 0, outcome.output
    assert "registered /animate" in outcome.output
    [request] = discord.received
    assert (request.method, request.path) == ("PUT", "/api/applications/app1/guilds/g1/commands")
    assert request.headers["authorization"] == "Bot bot-secret"
    [command] = json.loads(request.body)
    options = {option["name"]: option for option in command["options"]}
    assert options["image"]["type"] == 11 and options["image"]["required"] is True
    assert [c["value"] for c in options["model"]["choices"]] == ["wan2.2", "ltx-2.3"]


# Slack.

VIDEO = b"\x00\x00\x00\x18ftypmp42 not really a video"


def slack_job(
    services: Services,
    slack: LocalServer,
    *,
    event: str = "job.completed",
    prompt: str = "wave <!channel> & go",
    uses: int = 0,
    thread_ts: str | None = "1700000000.000100",
    error: dict[str, str] | None = None,
    stored: bool = True,
) -> dict[str, Any]:
    """A Slack job with a stored video (once completed); the envelope of ``event``."""
    with services.db.transaction() as session:
        job = create_job(session, services.db, {"prompt": prompt}, project_id="prj_default")
        job.chat_reply = slack_reply_target(
            channel="C1",
            thread_ts=thread_ts,
            response_url=f"{slack.url}/commands/T1/1/response-secret",
            uses=uses,
        )
        data: dict[str, Any] = {
            "id": job.id,
            "model_id": "wan2.2",
            "input": {"prompt": prompt},
            "upstream": {"eta": 12.4},
            "outputs": [],
        }
        if event == "job.completed":
            key = f"outputs/{job.id}/0.mp4"
            if stored:
                services.storage.put(key, io.BytesIO(VIDEO), content_type="video/mp4")
            job.outputs = [{"key": key, "content_type": "video/mp4"}]
            job.status = JobStatus.COMPLETED
            data["outputs"] = [{"url": f"https://motionhook.example/media/{key}?sig=s"}]
        data["status"] = job.status
        data["error"] = error
    return {"id": "evt_1", "type": event, "data": data}


def record_answered_replies(services: Services, job_id: str, count: int) -> None:
    """``count`` earlier slack_reply attempts of the job that Slack answered."""
    with services.db.transaction() as session:
        event = new_event(session, "job.processing", {}, job_id=job_id, project_id="prj_default")
        delivery = add_delivery(
            session,
            event,
            project_id="prj_default",
            kind="slack_reply",
            subscription_id=None,
            target_url=None,
            job_id=job_id,
        )
        session.flush()
        for _ in range(count):
            session.add(
                DeliveryAttempt(
                    delivery_id=delivery.id, status_code=200, latency_ms=1.0, outcome="delivered"
                )
            )


def send_to_slack(
    services: Services,
    *,
    bot_token: str | None = BOT_TOKEN,
    fake: Responder | None = None,
    minutes_later: int = 0,
    answered_before: int = 0,
    **job: Any,
) -> tuple[AttemptResult, list[Received]]:
    """Send one Slack reply to a fresh fake of Slack; the attempt and what Slack received."""
    http = make_session(allow_private=True)
    with LocalServer(fake or fake_slack()) as slack:
        settings = replace(
            services.settings, slack_api_url=slack.url + "/api", slack_bot_token=bot_token
        )
        envelope = slack_job(services, slack, **job)
        record_answered_replies(services, envelope["data"]["id"], answered_before)
        now = datetime.now(UTC) + timedelta(minutes=minutes_later)
        result = send_reply(replace(services, settings=settings), http, envelope, now=now)
    return result, slack.received


def test_slack_result_is_a_v2_upload_in_the_thread_with_the_prompt(services: Services) -> None:
    result, received = send_to_slack(services)
    assert result.outcome.result == "delivered", result
    calls = [urlsplit(r.path).path for r in received]
    assert calls == [
        "/api/files.getUploadURLExternal",
        "/upload/F1",
        "/api/files.completeUploadExternal",
    ]
    get_url, upload, complete = received
    assert int(api_params(get_url)["length"]) == len(VIDEO)
    assert upload.body == VIDEO
    params = api_params(complete)
    assert params["channel_id"] == "C1"
    assert params["thread_ts"] == "1700000000.000100"
    assert params["initial_comment"] == "wave &lt;!channel&gt; &amp; go"
    assert complete.headers["authorization"] == f"Bearer {BOT_TOKEN}"


def test_slack_ratelimited_is_retried_after_retry_after(services: Services) -> None:
    result, _ = send_to_slack(services, fake=fake_slack(ratelimit_first_upload=True))
    assert result.status == 429
    assert result.outcome.result == "retry"
    assert result.outcome.retry_after == 1.0


@pytest.mark.parametrize(
    ("code", "outcome"),
    [("channel_not_found", "permanent"), ("not_in_channel", "failed"), ("ratelimited", "retry")],
)
def test_slack_error_with_http_200_is_not_a_success(
    services: Services, code: str, outcome: str
) -> None:
    result, _ = send_to_slack(services, fake=fake_slack(complete_error=code))
    assert result.outcome.result == outcome
    assert code in result.response_excerpt


def test_slack_failure_is_posted_to_the_thread(services: Services) -> None:
    error = {"code": "upstream_error", "message": "<!here> broke"}
    result, received = send_to_slack(services, event="job.failed", error=error)
    assert result.outcome.result == "delivered", result
    [request] = received
    assert urlsplit(request.path).path == "/api/chat.postMessage"
    params = api_params(request)
    assert params["channel"] == "C1" and params["thread_ts"] == "1700000000.000100"
    assert "<!here>" not in json.dumps(params) and "&lt;!here&gt;" in json.dumps(params)


def test_slack_video_pruned_meanwhile_is_posted_as_its_link(services: Services) -> None:
    result, received = send_to_slack(services, stored=False)
    assert result.outcome.result == "delivered", result
    [request] = received
    assert urlsplit(request.path).path == "/api/chat.postMessage"
    assert "https://motionhook.example/media/" in json.dumps(api_params(request))


def test_slack_without_bot_token_posts_the_link_to_response_url(services: Services) -> None:
    result, received = send_to_slack(services, bot_token=None)
    assert result.outcome.result == "delivered", result
    [request] = received
    assert request.path == "/commands/T1/1/response-secret"
    posted = json.loads(request.body)
    assert posted["response_type"] == "in_channel"
    assert "wave &lt;!channel&gt; &amp; go" in json.dumps(posted)
    assert "https://motionhook.example/media/" in json.dumps(posted)


@pytest.mark.parametrize(
    ("uses", "answered", "minutes"),
    [(0, 0, 31), (5, 0, 1), (1, 4, 0)],
    ids=["expired", "used five times", "ack and four replies"],
)
def test_slack_without_bot_token_after_response_url_fails_naming_the_setting(
    services: Services, uses: int, answered: int, minutes: int
) -> None:
    result, received = send_to_slack(
        services, bot_token=None, uses=uses, answered_before=answered, minutes_later=minutes
    )
    assert result.outcome.result == "permanent"
    assert "MOTIONHOOK_SLACK_BOT_TOKEN" in result.outcome.reason
    assert received == []


def test_slack_progress_is_an_ephemeral_generating_message(services: Services) -> None:
    result, received = send_to_slack(services, event="job.processing")
    assert result.outcome.result == "delivered", result
    [request] = received
    assert request.path == "/commands/T1/1/response-secret"
    assert json.loads(request.body) == {
        "text": "⏳ Generating, about 12 s",
        "response_type": "ephemeral",
    }
    # Progress keeps the last of the five uses for the result.
    skipped, received = send_to_slack(services, event="job.processing", uses=4)
    assert skipped.outcome.result == "permanent"
    assert received == []


def test_discord_progress_edit_says_generating_about_n_seconds(
    services: Services, api: LocalServer
) -> None:
    configured = services_with(services, api)
    http = make_session(allow_private=True)
    with services.db.transaction() as session:
        job = create_job(session, services.db, {"prompt": "p"}, project_id="prj_default")
        job.chat_reply = discord_reply_target("app1", "tok", "c1")
        job.status = JobStatus.PROCESSING
        data = {"id": job.id, "status": "processing", "upstream": {"eta": 30}}
    envelope = {"id": "evt_2", "type": "job.processing", "data": data}
    result = send_reply(configured, http, envelope, now=datetime.now(UTC))
    assert result.outcome.result == "delivered"
    [request] = api.received
    assert request.method == "PATCH"
    assert json.loads(request.body) == {
        "content": "⏳ Generating, about 30 s",
        "embeds": [],
        "allowed_mentions": {"parse": []},
    }


def waiting_discord_job(services: Services, *, ahead: int) -> str:
    """A Discord job waiting for a slot behind ``ahead`` waiting jobs; its id."""
    with services.db.transaction() as session:
        for _ in range(ahead):
            earlier = create_job(session, services.db, {"prompt": "p"}, project_id="prj_default")
            earlier.created_at -= timedelta(seconds=1)
        job = create_job(session, services.db, {"prompt": "p"}, project_id="prj_default")
        job.chat_reply = discord_reply_target("app1", "tok", "c1")
        return job.id


def test_discord_queued_edit_says_the_position_at_send_time(
    services: Services, api: LocalServer
) -> None:
    job_id = waiting_discord_job(services, ahead=2)
    configured = services_with(services, api)
    http = make_session(allow_private=True)
    result = send_reply(configured, http, queued_envelope(job_id), now=datetime.now(UTC))
    assert result.outcome.result == "delivered"
    [request] = api.received
    assert (request.method, request.path) == (
        "PATCH",
        "/api/webhooks/app1/tok/messages/@original",
    )
    assert json.loads(request.body) == {
        "content": "🕒 Queued, position 3",
        "embeds": [],
        "allowed_mentions": {"parse": []},
    }


@pytest.mark.parametrize(
    "status", [JobStatus.QUEUED, JobStatus.PROCESSING, JobStatus.COMPLETED, JobStatus.FAILED]
)
def test_discord_queued_edit_after_the_job_left_the_queue_is_refused(
    services: Services, api: LocalServer, status: str
) -> None:
    job_id = waiting_discord_job(services, ahead=0)
    with services.db.transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.status = status
        # Holding a ModelsLab slot: being submitted (still queued), or submitted.
        job.upstream_slot_since = utcnow()
    configured = services_with(services, api)
    http = make_session(allow_private=True)
    result = send_reply(configured, http, queued_envelope(job_id), now=datetime.now(UTC))
    assert result.outcome.result == "permanent"
    assert result.outcome.reason == "superseded: the job has left the queue"
    assert api.received == []


def test_discord_queued_edit_after_the_token_expired_is_not_posted(
    services: Services, api: LocalServer
) -> None:
    job_id = waiting_discord_job(services, ahead=0)
    configured = services_with(services, api, discord_bot_token="bot-secret")
    http = make_session(allow_private=True)
    result = send_reply(configured, http, queued_envelope(job_id), now=later())
    assert result.outcome.result == "permanent"
    assert "progress is not posted" in result.outcome.reason
    assert api.received == []
