"""Slack channel: an incoming-webhook payload with a ``text`` fallback and Block Kit blocks.

User text (prompts, upstream error messages) is escaped for mrkdwn (``&``, ``<``,
``>``), so a prompt cannot mention ``<!channel>`` or forge a link, and is cut to
Slack's limits without splitting an escape sequence or a character.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.notifiers import fit, job_error, job_prompt, job_video_url, text_field

HEADER_LIMIT = 150
SECTION_TEXT_LIMIT = 3000
FIELD_TEXT_LIMIT = 2000
BUTTON_TEXT_LIMIT = 75
BUTTON_URL_LIMIT = 3000
FALLBACK_PROMPT_LIMIT = 300

_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}

TITLES = {
    "job.completed": "🎬 Video ready",
    "job.processing": "⏳ Video processing",
    "job.failed": "⚠️ Video failed",
    "test.ping": "🔔 motionhook test",
}


def escape_char(char: str) -> str:
    """Escape one character for Slack mrkdwn."""
    return _ESCAPES.get(char, char)


def escape(text: str) -> str:
    """Escape ``&``, ``<`` and ``>`` for Slack mrkdwn."""
    return "".join(escape_char(char) for char in text)


def _mrkdwn(text: str) -> dict[str, Any]:
    """Return a mrkdwn text object for already escaped and fitted text."""
    return {"type": "mrkdwn", "text": text}


def _plain(text: str, limit: int) -> dict[str, Any]:
    """Return a plain_text object cut to ``limit``."""
    return {"type": "plain_text", "text": fit(text, limit), "emoji": True}


def _ping(data: Mapping[str, Any]) -> dict[str, Any]:
    """Return the payload of a test.ping event."""
    message = text_field(data, "message", "Test notification from motionhook")
    text = f"motionhook test: {fit(message, 2000, escape=escape_char)}"
    blocks: list[dict[str, Any]] = [{"type": "section", "text": _mrkdwn(text)}]
    subscription = text_field(data, "subscription_id", "")
    if subscription:
        label = f"Subscription `{fit(subscription, 100, escape=escape_char)}`"
        blocks.append({"type": "context", "elements": [_mrkdwn(label)]})
    return {"text": text, "blocks": blocks}


def render(envelope: Mapping[str, Any]) -> dict[str, Any]:
    """Return the Slack incoming-webhook payload for ``envelope``."""
    event_type = str(envelope.get("type", ""))
    data = envelope.get("data")
    data = data if isinstance(data, Mapping) else {}
    if event_type == "test.ping":
        return _ping(data)

    title = TITLES.get(event_type, f"motionhook {event_type}")
    prompt = job_prompt(data)
    error = job_error(data)
    url = job_video_url(data) if event_type == "job.completed" else None

    if event_type == "job.failed":
        detail = error[1] if error and error[1] else "unknown error"
        fallback = f"Video failed: {fit(detail, FALLBACK_PROMPT_LIMIT, escape=escape_char)}"
    else:
        label = title.split(" ", 1)[1]
        summary = (
            fit(prompt, FALLBACK_PROMPT_LIMIT, escape=escape_char) if prompt else "(no prompt)"
        )
        fallback = f"{label}: {summary}"

    prompt_text = fit(prompt, SECTION_TEXT_LIMIT, escape=escape_char) if prompt else "_No prompt_"
    fields = [
        _mrkdwn(f"*Model*\n{fit(text_field(data, 'model_id'), 200, escape=escape_char)}"),
        _mrkdwn(f"*Job*\n`{fit(text_field(data, 'id'), 200, escape=escape_char)}`"),
    ]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": _plain(title, HEADER_LIMIT)},
        {"type": "section", "text": _mrkdwn(prompt_text)},
        {"type": "section", "fields": fields},
    ]
    if event_type == "job.failed":
        code, message = error if error else ("error", "")
        detail = fit(message or "unknown error", SECTION_TEXT_LIMIT - 100, escape=escape_char)
        blocks.append({"type": "section", "text": _mrkdwn(f"*Error* `{code}`\n{detail}")})
    if url is not None and len(url) <= BUTTON_URL_LIMIT:
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": _plain("Open video", BUTTON_TEXT_LIMIT),
                        "url": url,
                        "action_id": "open_video",
                        "style": "primary",
                    }
                ],
            }
        )
    return {"text": fallback, "blocks": blocks}
