"""Replies to the chat a job came from: one delivery per job event, sent by the worker.

Discord: the deferred answer (``@original``) is edited with each event while the
interaction token lives (15 minutes); after that the result is posted to the
channel with the bot token, or the delivery fails saying why.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import requests

from service.config import Settings
from service.db import Database
from service.models import Job, JobStatus
from service.notifiers import Message, json_body
from service.notifiers import discord as discord_render
from service.notifiers.policy import AttemptResult, Outcome, send

DISCORD_REPLY = "discord_reply"
CHAT_REPLY_KINDS = frozenset({DISCORD_REPLY})
# Discord interaction tokens are valid this long after the interaction.
DISCORD_TOKEN_LIFETIME = timedelta(minutes=15)
FINAL_EVENTS = frozenset({"job.completed", "job.failed"})
FINISHED_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED})


def discord_reply_target(application_id: str, token: str, channel: str | None) -> dict[str, Any]:
    """The ``jobs.chat_reply`` of a Discord ``/animate``: where its replies go, until when."""
    expires = datetime.now(UTC) + DISCORD_TOKEN_LIFETIME
    return {
        "kind": DISCORD_REPLY,
        "application_id": application_id,
        "token": token,
        "channel": channel,
        "token_expires_at": expires.isoformat(),
    }


def _refused(reason: str) -> AttemptResult:
    """An attempt that sent nothing because it cannot succeed."""
    return AttemptResult(
        status=None,
        latency_ms=0.0,
        error=reason,
        response_excerpt="",
        outcome=Outcome("permanent", reason),
        pacing=0.0,
    )


def send_reply(
    db: Database,
    settings: Settings,
    http: requests.Session,
    envelope: Mapping[str, Any],
    *,
    now: datetime,
) -> AttemptResult:
    """Send one job event back to the chat its job came from."""
    data = envelope.get("data") or {}
    with db.transaction() as session:
        job = session.get(Job, str(data.get("id")))
        target = dict(job.chat_reply) if job is not None and job.chat_reply else None
        finished = job is not None and job.status in FINISHED_STATUSES
    if target is None:
        return _refused("the job and its chat are gone")
    if finished and envelope.get("type") not in FINAL_EVENTS:
        # A late progress edit must not overwrite the result.
        return _refused("superseded: the job has finished")
    payload = discord_render.render(envelope)
    api = settings.discord_api_url
    expires = datetime.fromisoformat(target["token_expires_at"])
    if now < expires:
        url = f"{api}/webhooks/{target['application_id']}/{target['token']}/messages/@original"
        message = Message(body=json_body(payload), headers={"content-type": "application/json"})
        method = "PATCH"
    elif envelope.get("type") not in FINAL_EVENTS:
        return _refused("the interaction token expired (15 minutes): progress is not posted")
    elif not settings.discord_bot_token or not target.get("channel"):
        return _refused(
            "the interaction token expired (15 minutes) and MOTIONHOOK_DISCORD_BOT_TOKEN "
            "is not set, so the result cannot be posted to the channel"
        )
    else:
        url = f"{api}/channels/{target['channel']}/messages"
        message = Message(
            body=json_body(payload),
            headers={
                "content-type": "application/json",
                "authorization": f"Bot {settings.discord_bot_token}",
            },
        )
        method = "POST"
    return send(
        http,
        url,
        message,
        kind="discord",
        timeout=settings.delivery_timeout,
        now=lambda: datetime.now(UTC),
        method=method,
    )
