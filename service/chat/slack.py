"""Slack: the v0 request signature, ``/animate <image URL> <prompt>`` and the shortcut.

Like the Discord module, these functions take the raw body and give back the
answer; the Flask views are in ``service/api/chat.py``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import requests
from slack_sdk.signature import SignatureVerifier

from service.chat.common import MAX_PROMPT, BadSignature, ChatGate, ChatRefusal, queue_chat_job
from service.chat.replies import slack_reply_target
from service.extension import Services
from service.notifiers import fit
from service.notifiers.slack import escape_char

log = logging.getLogger("motionhook.chat")

SHORTCUT_CALLBACK = "animate_image"
MESSAGE_SHORTCUT = "message_action"
USAGE = "usage: /animate <image URL> <prompt>"
# Seconds for posting the shortcut's "queued" message: the answer is due within 3 s.
ACK_TIMEOUT = 0.8
TEXT_LIMIT = 3000


def verify(signing_secret: str, headers: Mapping[str, str], body: bytes) -> None:
    """Check ``X-Slack-Signature`` (v0 HMAC of ``v0:timestamp:body``) and the 5-minute window."""
    try:
        valid = SignatureVerifier(signing_secret).is_valid_request(body, headers)
    except ValueError:  # a timestamp that is not a number
        valid = False
    if not valid:
        raise BadSignature("invalid or stale request signature")


@dataclass(frozen=True)
class SlackAnimate:
    """An ``/animate`` request from Slack, read from a verified body."""

    team: str | None
    channel: str | None
    user: str
    prompt: str
    image_url: str
    response_url: str | None
    # The thread the result goes to (a shortcut's source message); None: the channel.
    thread_ts: str | None = None
    # A file shared in Slack (``url_private``): read with the bot token.
    private_file: bool = False

    @property
    def source(self) -> dict[str, Any]:
        return {"kind": "slack", "workspace": self.team, "channel": self.channel, "user": self.user}


def _checked_prompt(text: str) -> str:
    prompt = text.strip()
    if not prompt:
        raise ChatRefusal(f"prompt: describe what should happen in the video ({USAGE})")
    if len(prompt) > MAX_PROMPT:
        raise ChatRefusal(f"prompt: at most {MAX_PROMPT} characters")
    return prompt


def _unwrap_link(token: str) -> str:
    """A URL as Slack may send it in command text: ``<https://…>`` or ``<https://…|label>``."""
    if token.startswith("<") and token.endswith(">"):
        token = token[1:-1].split("|", 1)[0]
    return token


def parse_form(body: bytes) -> dict[str, str]:
    """The fields of a verified ``application/x-www-form-urlencoded`` body."""
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
    except (UnicodeDecodeError, ValueError):
        raise ChatRefusal("the request is not a form") from None


def read_command(form: dict[str, str]) -> SlackAnimate:
    """The ``/animate <image URL> <prompt>`` command; ChatRefusal names what is wrong."""
    parts = form.get("text", "").strip().split(None, 1)
    if not parts:
        raise ChatRefusal(f"image: give the URL of the image to animate ({USAGE})")
    image_url = _unwrap_link(parts[0])
    if not image_url.startswith(("https://", "http://")):
        raise ChatRefusal(f"image: {fit(image_url, 80)!r} is not an http(s) URL ({USAGE})")
    return SlackAnimate(
        team=form.get("team_id") or None,
        channel=form.get("channel_id") or None,
        user=form.get("user_id", ""),
        prompt=_checked_prompt(parts[1] if len(parts) > 1 else ""),
        image_url=image_url,
        response_url=form.get("response_url") or None,
    )


def parse_interaction(form: dict[str, str]) -> dict[str, Any]:
    """The interaction payload of a verified body (the form field ``payload``)."""
    try:
        payload = json.loads(form.get("payload", ""))
    except ValueError:
        raise ChatRefusal("the interaction payload is not JSON") from None
    if not isinstance(payload, dict):
        raise ChatRefusal("the interaction payload is not a JSON object")
    return payload


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _id(value: Any) -> str | None:
    return str(value["id"]) if isinstance(value, dict) and value.get("id") else None


def read_shortcut(payload: dict[str, Any], *, max_bytes: int) -> SlackAnimate:
    """The "Animate this image" message shortcut: the message's image file and its text."""
    if payload.get("type") != MESSAGE_SHORTCUT or payload.get("callback_id") != SHORTCUT_CALLBACK:
        raise ChatRefusal(f"this shortcut is not supported; use {SHORTCUT_CALLBACK!r}")
    message = payload.get("message")
    message = message if isinstance(message, dict) else {}
    listed = message.get("files")
    files = [f for f in listed if isinstance(f, dict)] if isinstance(listed, list) else []
    images = [f for f in files if str(f.get("mimetype") or "").startswith("image/")]
    if not images:
        found = files[0].get("mimetype") if files else None
        raise ChatRefusal(
            f"image: the message has no image file (found {found})"
            if found
            else "image: the message has no image file"
        )
    image = images[0]
    size = image.get("size")
    if isinstance(size, int) and size > max_bytes:
        raise ChatRefusal(f"image: larger than {max_bytes} bytes")
    url = str(image.get("url_private") or "")
    if not url.startswith(("https://", "http://")):
        raise ChatRefusal("image: Slack did not give the file's address")
    text = str(message.get("text") or "")
    if not text.strip():
        raise ChatRefusal("prompt: the message needs text saying what should happen")
    return SlackAnimate(
        team=_id(payload.get("team")),
        channel=_id(payload.get("channel")),
        user=_id(payload.get("user")) or "",
        prompt=_checked_prompt(text),
        image_url=url,
        response_url=_text(payload.get("response_url")),
        thread_ts=_text(message.get("thread_ts")) or _text(message.get("ts")),
        private_file=True,
    )


def ephemeral(text: str) -> dict[str, Any]:
    """A message only the user who asked sees; ``text`` is already mrkdwn."""
    return {"response_type": "ephemeral", "text": text}


def refusal_text(refusal: ChatRefusal) -> str:
    return "Sorry, I cannot animate that: " + fit(str(refusal), TEXT_LIMIT - 40, escape=escape_char)


def queued_text(position: int | None, prompt: str, *, thread: bool) -> str:
    """The acknowledgement: where the job waits, and where the video will come."""
    where = "in the thread" if thread else "here"
    place = f"Queued, position {position}" if position else "Queued"
    quoted = fit(prompt, 500, escape=escape_char)
    return f"{place}: _{quoted}_. I will post the video {where} when it is ready."


def _queue(services: Services, gate: ChatGate, http: requests.Session, ask: SlackAnimate) -> str:
    """Queue the job of a read request; the acknowledgement text."""
    bot_token = services.settings.slack_bot_token
    if ask.private_file and not bot_token:
        raise ChatRefusal(
            "MOTIONHOOK_SLACK_BOT_TOKEN is not set, so I cannot read files shared in Slack"
        )
    reply = slack_reply_target(
        channel=ask.channel,
        thread_ts=ask.thread_ts,
        response_url=ask.response_url,
        # The shortcut's acknowledgement is itself posted to the response_url.
        uses=1 if ask.private_file else 0,
    )
    position = queue_chat_job(
        services,
        gate,
        http,
        source=ask.source,
        image_url=ask.image_url,
        origin="Slack" if ask.private_file else "the image host",
        params={"prompt": ask.prompt},
        reply=reply,
        headers={"Authorization": f"Bearer {bot_token}"} if ask.private_file else None,
    )
    return queued_text(position, ask.prompt, thread=ask.thread_ts is not None)


def answer_command(
    services: Services, gate: ChatGate, http: requests.Session, body: bytes
) -> dict[str, Any]:
    """The answer to a verified slash command: "queued" (a job is queued) or a refusal."""
    try:
        return ephemeral(_queue(services, gate, http, read_command(parse_form(body))))
    except ChatRefusal as refusal:
        return ephemeral(refusal_text(refusal))


def answer_interaction(
    services: Services, gate: ChatGate, http: requests.Session, body: bytes
) -> None:
    """Handle a verified interaction; its answer goes to the ``response_url``.

    Slack takes no message in the acknowledgement of a shortcut, so "queued" or the
    refusal is posted to the interaction's ``response_url`` before the empty 200.
    Other interactions (the "Open video" link button of a result) are only acknowledged.
    """
    response_url: str | None = None
    try:
        payload = parse_interaction(parse_form(body))
        if payload.get("type") != MESSAGE_SHORTCUT:
            return
        response_url = _text(payload.get("response_url"))
        text = _queue(
            services,
            gate,
            http,
            read_shortcut(payload, max_bytes=services.settings.max_upload_bytes),
        )
    except ChatRefusal as refusal:
        text = refusal_text(refusal)
    if response_url:
        try:
            http.post(response_url, json=ephemeral(text), timeout=ACK_TIMEOUT).close()
        except requests.RequestException as exc:
            log.warning("slack: the acknowledgement could not be posted (%s)", type(exc).__name__)
