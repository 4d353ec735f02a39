"""Replies to Discord after the 15-minute interaction token: the bot-token fallback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from service.chat.replies import discord_reply_target, send_reply
from service.cli import main
from service.extension import Services
from service.jobs import create_job
from service.models import JobStatus
from service.outbound import make_session
from tests.local_http import Answer, LocalServer, Received


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
