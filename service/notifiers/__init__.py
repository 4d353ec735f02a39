"""Channel formats: turn an event envelope into the HTTP message one subscription receives.

Each channel module is pure (no I/O): :mod:`.webhook` signs the envelope with
Standard Webhooks headers, :mod:`.slack` builds an incoming-webhook Block Kit
payload and :mod:`.discord` an execute-webhook payload. :mod:`.policy` sends a
message and decides what an answer means. The text helpers here keep user text
(prompts, upstream error messages) within each channel's limits without ever
producing invalid UTF-8.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

KINDS = ("slack", "discord", "webhook")
ELLIPSIS = "…"

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_ZWJ = "\u200d"


@dataclass(frozen=True)
class Message:
    """One outbound HTTP request body and its headers."""

    body: bytes
    headers: dict[str, str]


def clean_text(text: str) -> str:
    """Replace lone surrogates with U+FFFD and drop control characters other than tab/newline."""
    return _CONTROL.sub("", _LONE_SURROGATE.sub("\ufffd", text))


def text_length(text: str) -> int:
    """Return the length in UTF-16 code units, the strictest way chat APIs count characters."""
    return len(text) + sum(1 for char in text if ord(char) > 0xFFFF)


def _extends_grapheme(char: str) -> bool:
    """Tell whether ``char`` belongs to the grapheme before it (combining mark, ZWJ, ...)."""
    code = ord(char)
    return (
        char == _ZWJ
        or unicodedata.category(char) in {"Mn", "Me", "Mc"}
        or 0xFE00 <= code <= 0xFE0F  # variation selectors
        or 0x1F3FB <= code <= 0x1F3FF  # emoji skin-tone modifiers
        or 0xE0020 <= code <= 0xE007F  # emoji tag sequences
        or 0xE0100 <= code <= 0xE01EF
    )


def _is_regional_indicator(char: str) -> bool:
    """Tell whether ``char`` is half of a flag emoji."""
    return 0x1F1E6 <= ord(char) <= 0x1F1FF


def fit(text: str, limit: int, *, escape: Callable[[str], str] | None = None) -> str:
    """Return ``text`` escaped and cut to ``limit`` UTF-16 units, ending with "…" when cut.

    The cut never splits a surrogate pair, an escape sequence (``&amp;``) or, as far
    as cheaply possible, an emoji sequence or a letter from its combining marks.
    """
    text = clean_text(text)
    pieces = [escape(char) if escape else char for char in text]
    if sum(text_length(piece) for piece in pieces) <= limit:
        return "".join(pieces)
    budget = limit - text_length(ELLIPSIS)
    kept = 0
    used = 0
    for piece in pieces:
        size = text_length(piece)
        if used + size > budget:
            break
        used += size
        kept += 1
    # Back off so the cut falls on a grapheme boundary.
    while kept > 0 and (_extends_grapheme(text[kept]) or text[kept - 1] == _ZWJ):
        kept -= 1
    trailing_flags = 0
    while trailing_flags < kept and _is_regional_indicator(text[kept - 1 - trailing_flags]):
        trailing_flags += 1
    if trailing_flags % 2 and _is_regional_indicator(text[kept]):
        kept -= 1
    return "".join(pieces[:kept]).rstrip() + ELLIPSIS


def job_prompt(data: Mapping[str, Any]) -> str:
    """Return the job's prompt, or an empty string."""
    job_input = data.get("input")
    prompt = job_input.get("prompt") if isinstance(job_input, Mapping) else None
    return prompt if isinstance(prompt, str) else ""


def job_video_url(data: Mapping[str, Any]) -> str | None:
    """Return the first output's durable URL (falling back to its upstream URL), if http(s)."""
    outputs = data.get("outputs")
    if not isinstance(outputs, Sequence) or isinstance(outputs, str) or not outputs:
        return None
    first = outputs[0]
    if not isinstance(first, Mapping):
        return None
    for key in ("url", "source_url"):
        url = first.get(key)
        if isinstance(url, str) and url.startswith(("https://", "http://")):
            return url
    return None


def job_error(data: Mapping[str, Any]) -> tuple[str, str] | None:
    """Return the job's ``(code, message)`` error, or None; the code is a safe identifier."""
    error = data.get("error")
    if not isinstance(error, Mapping):
        return None
    code = re.sub(r"[^A-Za-z0-9_.-]", "", str(error.get("code") or "error"))[:64] or "error"
    message = str(error.get("message") or "").strip()
    return code, message


def text_field(data: Mapping[str, Any], key: str, default: str = "unknown") -> str:
    """Return ``data[key]`` as display text."""
    value = data.get(key)
    return str(value) if value not in (None, "") else default


def json_body(payload: Mapping[str, Any]) -> bytes:
    """Serialize a chat payload as compact UTF-8 JSON."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def render_message(
    kind: str,
    envelope: Mapping[str, Any],
    *,
    secrets: Sequence[str],
    timestamp: datetime | None = None,
    serialized: str | None = None,
) -> Message:
    """Render ``envelope`` for a subscription of ``kind`` (slack, discord or webhook).

    ``serialized``: the envelope as :func:`.webhook.serialize` writes it, if known.
    """
    # Imported here because the channel modules import the helpers above.
    from service.notifiers import discord, slack, webhook

    if kind == "webhook":
        return webhook.render(envelope, secrets, timestamp, serialized)
    if kind == "slack":
        payload = slack.render(envelope)
    elif kind == "discord":
        payload = discord.render(envelope)
    else:
        raise ValueError(f"unknown subscription kind {kind!r}; expected one of {', '.join(KINDS)}")
    return Message(body=json_body(payload), headers={"content-type": "application/json"})
