"""Discord channel: an execute-webhook payload with the video URL as content and one embed.

The video URL goes in ``content`` so Discord unfurls it into a player. User text
is escaped for Discord markdown (no masked links, no formatting tricks), cut to
Discord's limits, and ``allowed_mentions`` is empty so nothing can ping.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from service.notifiers import (
    fit,
    job_error,
    job_prompt,
    job_video_url,
    text_field,
    text_length,
)

CONTENT_LIMIT = 2000
TITLE_LIMIT = 256
DESCRIPTION_LIMIT = 4096
FIELD_NAME_LIMIT = 256
FIELD_VALUE_LIMIT = 1024
FOOTER_LIMIT = 2048
EMBED_TOTAL_LIMIT = 6000
URL_LIMIT = 2000

GREEN = 0x2ECC71
RED = 0xE74C3C
BLUE = 0x3498DB

_MARKDOWN = frozenset("\\*_~`|>[]()<#-")

STYLES: dict[str, tuple[str, int, str]] = {
    # event type: (embed title, color, content when there is no video URL)
    "job.completed": ("🎬 Video ready", GREEN, "Video ready"),
    "job.processing": ("⏳ Video processing", BLUE, "Video processing"),
    "job.failed": ("⚠️ Video failed", RED, "Video failed"),
    "test.ping": ("🔔 motionhook test", BLUE, "motionhook test notification"),
}


def escape_char(char: str) -> str:
    """Escape one character for Discord markdown."""
    return "\\" + char if char in _MARKDOWN else char


def _field(name: str, value: str, *, inline: bool) -> dict[str, Any]:
    """Return an embed field with the name and escaped value cut to Discord's limits."""
    return {
        "name": fit(name, FIELD_NAME_LIMIT),
        "value": fit(value, FIELD_VALUE_LIMIT, escape=escape_char) or "\u200b",
        "inline": inline,
    }


def _timestamp(*candidates: object) -> str | None:
    """Return the first candidate that is a valid ISO 8601 timestamp."""
    for value in candidates:
        if isinstance(value, str):
            try:
                datetime.fromisoformat(value)
            except ValueError:
                continue
            return value
    return None


def render(envelope: Mapping[str, Any]) -> dict[str, Any]:
    """Return the Discord execute-webhook payload for ``envelope``."""
    event_type = str(envelope.get("type", ""))
    data = envelope.get("data")
    data = data if isinstance(data, Mapping) else {}
    title, color, content = STYLES.get(
        event_type, (f"motionhook {event_type}", BLUE, f"motionhook {event_type}")
    )

    fields: list[dict[str, Any]] = []
    if event_type == "test.ping":
        text = text_field(data, "message", "Test notification from motionhook")
        subscription = text_field(data, "subscription_id", "")
        if subscription:
            fields.append(_field("Subscription", subscription, inline=True))
        url = None
    else:
        text = job_prompt(data)
        fields.append(_field("Model", text_field(data, "model_id"), inline=True))
        fields.append(_field("Job", text_field(data, "id"), inline=True))
        fields.append(_field("Status", text_field(data, "status"), inline=True))
        error = job_error(data)
        if error is not None:
            code, message = error
            fields.append(_field("Error", f"{code}: {message or 'unknown error'}", inline=False))
        url = job_video_url(data) if event_type == "job.completed" else None

    embed: dict[str, Any] = {"title": fit(title, TITLE_LIMIT), "color": color}
    footer = fit(f"motionhook · {text_field(envelope, 'id', '')}".rstrip(" ·"), FOOTER_LIMIT)
    embed["footer"] = {"text": footer}
    if url is not None and len(url) <= URL_LIMIT:
        embed["url"] = url
        content = url
    used = text_length(embed["title"]) + text_length(footer)
    used += sum(text_length(f["name"]) + text_length(f["value"]) for f in fields)
    budget = min(DESCRIPTION_LIMIT, EMBED_TOTAL_LIMIT - used)
    if text and budget > 1:
        embed["description"] = fit(text, budget, escape=escape_char)
    if fields:
        embed["fields"] = fields
    timestamp = _timestamp(
        data.get("completed_at"), data.get("updated_at"), envelope.get("created_at")
    )
    if timestamp is not None:
        embed["timestamp"] = timestamp
    return {
        "content": fit(content, CONTENT_LIMIT),
        "embeds": [embed],
        "allowed_mentions": {"parse": []},
    }
