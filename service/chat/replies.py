"""Replies to the chat a job came from: one delivery per job event, sent by the worker.

Discord: the deferred answer (``@original``) is edited with each event while the
interaction token lives (15 minutes); after that the result is posted to the
channel with the bot token, or the delivery fails saying why. A job that waits for
a ModelsLab slot gets one more edit, "queued, position N", from a delivery without
an event (``QUEUED``): there is no public event for waiting.

Slack: progress goes to the request's ``response_url`` as an ephemeral message;
the result, with the bot token, is the video uploaded to the channel (a
shortcut's thread) through ``files_upload_v2``; without one, the durable link
goes to the ``response_url`` while it is valid (30 minutes, 5 uses), and after
that the delivery fails saying why.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.error import URLError

import requests
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackRequestError
from slack_sdk.web import SlackResponse
from sqlalchemy import func, select

from service.capacity import queue_position
from service.extension import Services
from service.models import Delivery, DeliveryAttempt, Job, JobStatus
from service.notifiers import Message, fit, job_prompt, json_body
from service.notifiers import discord as discord_render
from service.notifiers import slack as slack_render
from service.notifiers.policy import (
    EXCERPT_BYTES,
    SLACK_PERMANENT_ERRORS,
    AttemptResult,
    Outcome,
    classify,
    send,
)

DISCORD_REPLY = "discord_reply"
SLACK_REPLY = "slack_reply"
CHAT_REPLY_KINDS = frozenset({DISCORD_REPLY, SLACK_REPLY})
# Discord interaction tokens are valid this long after the interaction.
DISCORD_TOKEN_LIFETIME = timedelta(minutes=15)
# A Slack response_url takes this many messages within this long.
RESPONSE_URL_LIFETIME = timedelta(minutes=30)
RESPONSE_URL_USES = 5
INITIAL_COMMENT_LIMIT = 3000
FINAL_EVENTS = frozenset({"job.completed", "job.failed"})
FINISHED_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED})
# The type of the envelope a delivery without an event is sent with: the Discord edit
# "queued, position N". It is never an event and never goes to subscriptions.
QUEUED = "job.queued"


def _reply_target(kind: str, expiry: str, lifetime: timedelta, **where: Any) -> dict[str, Any]:
    """A ``jobs.chat_reply``: where the job's replies go, and (``expiry``) until when."""
    expires = datetime.now(UTC) + lifetime
    return {"kind": kind, **where, expiry: expires.isoformat()}


def discord_reply_target(application_id: str, token: str, channel: str | None) -> dict[str, Any]:
    """The reply target of a Discord ``/animate``: the interaction token lives 15 minutes."""
    return _reply_target(
        DISCORD_REPLY,
        "token_expires_at",
        DISCORD_TOKEN_LIFETIME,
        application_id=application_id,
        token=token,
        channel=channel,
    )


def slack_reply_target(
    *, channel: str | None, thread_ts: str | None, response_url: str | None, uses: int
) -> dict[str, Any]:
    """The reply target of a Slack request; ``uses``: response_url posts already made."""
    return _reply_target(
        SLACK_REPLY,
        "response_url_expires_at",
        RESPONSE_URL_LIFETIME,
        channel=channel,
        thread_ts=thread_ts,
        response_url=response_url,
        response_url_uses=uses,
    )


def queued_envelope(job_id: str | None) -> dict[str, Any]:
    """The envelope of a delivery without an event: its job's "queued" edit."""
    return {"id": None, "type": QUEUED, "data": {"id": job_id}}


def progress_text(data: Mapping[str, Any]) -> str:
    """What a chat shows while the video is made: "generating, about N s"."""
    upstream = data.get("upstream")
    eta = upstream.get("eta") if isinstance(upstream, Mapping) else None
    if isinstance(eta, int | float) and not isinstance(eta, bool) and eta > 0:
        return f"⏳ Generating, about {round(eta)} s"
    return "⏳ Generating"


@dataclass(frozen=True)
class _ReplyJob:
    """What sending one reply reads of its job, in one short transaction."""

    target: dict[str, Any]
    finished: bool
    # Storage key of the first stored output, if any.
    video_key: str | None
    # Slack: posts to the response_url so far (the acknowledgement and each answered
    # attempt; with a bot token the result's calls count too, harmlessly: they come last).
    response_url_uses: int
    # Where the job waits for a slot (read for the "queued" edit only); None: not waiting.
    queue_position: int | None


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


def _read_job(services: Services, job_id: str, *, position: bool) -> _ReplyJob | None:
    """The job's reply target and state; with ``position``, its place in the queue now."""
    with services.db.transaction() as session:
        job = session.get(Job, job_id)
        if job is None or not job.chat_reply:
            return None
        target = dict(job.chat_reply)
        stored = [item["key"] for item in job.outputs or [] if item.get("key")]
        uses = 0
        if target["kind"] == SLACK_REPLY:
            attempts = session.scalar(
                select(func.count())
                .select_from(DeliveryAttempt)
                .join(Delivery, Delivery.id == DeliveryAttempt.delivery_id)
                .where(
                    Delivery.job_id == job_id,
                    Delivery.kind == SLACK_REPLY,
                    DeliveryAttempt.status_code.is_not(None),
                )
            )
            uses = int(target.get("response_url_uses") or 0) + int(attempts or 0)
        return _ReplyJob(
            target=target,
            finished=job.status in FINISHED_STATUSES,
            video_key=stored[0] if stored else None,
            response_url_uses=uses,
            queue_position=queue_position(session, job) if position else None,
        )


def send_reply(
    services: Services,
    http: requests.Session,
    envelope: Mapping[str, Any],
    *,
    now: datetime,
) -> AttemptResult:
    """Send one job event back to the chat its job came from."""
    data = envelope.get("data") or {}
    queued = envelope.get("type") == QUEUED
    job = _read_job(services, str(data.get("id")), position=queued)
    if job is None:
        return _refused("the job and its chat are gone")
    if queued and job.queue_position is None:
        # Submitted (or being submitted): "generating" or the result says more, and this
        # edit must not overwrite it.
        return _refused("superseded: the job has left the queue")
    if job.finished and envelope.get("type") not in FINAL_EVENTS:
        # A late progress edit must not overwrite the result.
        return _refused("superseded: the job has finished")
    if job.target["kind"] == SLACK_REPLY:
        return _send_slack(services, http, envelope, job, now=now)
    return _send_discord(services, http, envelope, job, now=now)


def _send_discord(
    services: Services,
    http: requests.Session,
    envelope: Mapping[str, Any],
    job: _ReplyJob,
    *,
    now: datetime,
) -> AttemptResult:
    settings = services.settings
    target = job.target
    if envelope.get("type") in FINAL_EVENTS:
        payload = discord_render.render(envelope)
    else:
        if envelope.get("type") == QUEUED:
            content = f"🕒 Queued, position {job.queue_position}"
        else:
            content = progress_text(envelope.get("data") or {})
        payload = {"content": content, "embeds": [], "allowed_mentions": {"parse": []}}
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


def _send_slack(
    services: Services,
    http: requests.Session,
    envelope: Mapping[str, Any],
    job: _ReplyJob,
    *,
    now: datetime,
) -> AttemptResult:
    settings = services.settings
    target = job.target
    response_url = target.get("response_url")
    expires = datetime.fromisoformat(target["response_url_expires_at"])
    final = envelope.get("type") in FINAL_EVENTS
    # Progress leaves the response_url one use for the result.
    spare = RESPONSE_URL_USES - (0 if final else 1)
    usable = bool(response_url) and now < expires and job.response_url_uses < spare
    if not final:
        if not usable:
            return _refused("the response_url is used up or expired: progress is not posted")
        progress = progress_text(envelope.get("data") or {})
        return _post_response_url(services, http, str(response_url), progress, ephemeral=True)
    if settings.slack_bot_token and target.get("channel"):
        return _web_api(lambda: _post_result(services, envelope, job))
    if usable:
        return _post_response_url(
            services, http, str(response_url), slack_render.render(envelope), ephemeral=False
        )
    return _refused(
        "the response_url expired (30 minutes, 5 uses) and MOTIONHOOK_SLACK_BOT_TOKEN is not "
        "set, so the result cannot be posted to the channel"
    )


def _post_response_url(
    services: Services,
    http: requests.Session,
    url: str,
    content: str | dict[str, Any],
    *,
    ephemeral: bool,
) -> AttemptResult:
    """Post a message to a Slack response_url (``content``: mrkdwn text or a payload)."""
    payload = {"text": content} if isinstance(content, str) else dict(content)
    payload["response_type"] = "ephemeral" if ephemeral else "in_channel"
    message = Message(body=json_body(payload), headers={"content-type": "application/json"})
    return send(
        http,
        url,
        message,
        kind="slack",
        timeout=services.settings.delivery_timeout,
        now=lambda: datetime.now(UTC),
    )


def _post_result(services: Services, envelope: Mapping[str, Any], job: _ReplyJob) -> SlackResponse:
    """Upload the video to the channel (the thread); else post the message there.

    The message: a failure, or a video that is not stored (any more), by its link.
    """
    settings = services.settings
    # One attempt per delivery attempt: the delivery policy does the retrying.
    client = WebClient(
        token=settings.slack_bot_token,
        base_url=settings.slack_api_url + "/",
        timeout=int(max(settings.delivery_timeout, 1)),
        retry_handlers=[],
    )
    channel = str(job.target["channel"])
    thread_ts = job.target.get("thread_ts")
    data = envelope.get("data") or {}
    content = (
        _stored_video(services, job.video_key) if envelope.get("type") == "job.completed" else None
    )
    if content is not None:
        prompt = fit(job_prompt(data), INITIAL_COMMENT_LIMIT, escape=slack_render.escape_char)
        return client.files_upload_v2(
            channel=channel,
            thread_ts=thread_ts,
            content=content,
            filename=f"{data.get('id') or 'video'}.mp4",
            title="motionhook video",
            initial_comment=prompt,
        )
    payload = slack_render.render(envelope)
    return client.chat_postMessage(
        channel=channel, thread_ts=thread_ts, text=payload["text"], blocks=payload["blocks"]
    )


def _stored_video(services: Services, key: str | None) -> bytes | None:
    """The stored video, or None when there is none (not stored, or pruned since)."""
    if key is None:
        return None
    try:
        with services.storage.open(key) as video:
            return video.read()
    except FileNotFoundError:
        return None


def _excerpt(response: SlackResponse) -> str:
    data = response.data
    text = json.dumps(data) if isinstance(data, dict) else repr(data)
    return text[:EXCERPT_BYTES]


def _web_api(call: Callable[[], SlackResponse]) -> AttemptResult:
    """Make one Slack Web API call and classify it like any delivery attempt."""
    started = time.monotonic()
    error: str | None = None
    status: int | None = None
    excerpt = ""
    try:
        response = call()
        status = response.status_code
        excerpt = _excerpt(response)
        outcome = Outcome("delivered", "slack answered ok")
    except SlackApiError as exc:
        answer: SlackResponse = exc.response
        status = answer.status_code
        excerpt = _excerpt(answer)
        code = str(answer.get("error") or "")
        # ``ratelimited`` is retried after Retry-After whatever the HTTP status says.
        effective = 429 if code == "ratelimited" else status
        if effective < 300:  # Slack's Web API says "ok": false with HTTP 200
            reason = f"slack answered {code or 'an error'}"
            permanent = code in SLACK_PERMANENT_ERRORS
            outcome = Outcome("permanent" if permanent else "failed", reason)
        else:
            outcome = classify(
                "slack",
                status=effective,
                headers=dict(answer.headers or {}),
                body=excerpt.encode(),
                error=None,
                now=datetime.now(UTC),
            )
        error = outcome.reason
    except SlackRequestError as exc:
        # The upload step (files.slack.com); its message names status and body, not the URL.
        error = f"the file upload failed: {str(exc)[:300]}"
        outcome = Outcome("retry", error)
    except (URLError, OSError) as exc:
        error = f"could not reach the Slack API ({type(exc).__name__})"
        outcome = Outcome("retry", error)
    return AttemptResult(
        status=status,
        latency_ms=(time.monotonic() - started) * 1000,
        error=error,
        response_excerpt=excerpt,
        outcome=outcome,
        pacing=0.0,
    )
