"""Discord interactions: signature check, the ``/animate`` command, and the answers.

Pure over raw bytes and plain values, without Flask: the view in
``service/api/chat.py`` hands the request body and headers in and sends back what
these functions return.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from service.chat.common import MAX_PROMPT, BadSignature, ChatGate, ChatRefusal, queue_chat_job
from service.chat.replies import discord_reply_target
from service.extension import Services

PING = 1
APPLICATION_COMMAND = 2
PONG = 1
CHANNEL_MESSAGE = 4
DEFERRED_CHANNEL_MESSAGE = 5
EPHEMERAL = 1 << 6
# Nothing a user typed may ping anyone.
NO_MENTIONS: dict[str, list[str]] = {"parse": []}
MODELS = ("wan2.2", "ltx-2.3")
ANIMATE_COMMAND: dict[str, Any] = {
    "name": "animate",
    "type": 1,
    "description": "Turn an image into a short video",
    "options": [
        {"type": 11, "name": "image", "description": "The image to animate", "required": True},
        {"type": 3, "name": "prompt", "description": "What should happen", "required": True},
        {
            "type": 3,
            "name": "model",
            "description": "The video model",
            "choices": [{"name": model, "value": model} for model in MODELS],
        },
        {
            "type": 4,
            "name": "frames",
            "description": "Number of frames (1-25)",
            "min_value": 1,
            "max_value": 25,
        },
    ],
}


def verify(public_key: str, headers: Mapping[str, str], body: bytes) -> None:
    """Check ``X-Signature-Ed25519`` over ``X-Signature-Timestamp`` + the raw body.

    ``headers``: the request's headers, with lower-case names.
    """
    signature = headers.get("x-signature-ed25519", "")
    timestamp = headers.get("x-signature-timestamp", "")
    try:
        VerifyKey(bytes.fromhex(public_key)).verify(
            timestamp.encode() + body, bytes.fromhex(signature)
        )
    except (BadSignatureError, ValueError) as exc:
        raise BadSignature("invalid request signature") from exc


@dataclass(frozen=True)
class AnimateRequest:
    """An ``/animate`` command, read from a verified interaction."""

    application_id: str
    token: str
    guild: str | None
    channel: str | None
    user: str
    prompt: str
    model: str | None
    frames: int | None
    attachment_url: str
    attachment_type: str
    attachment_size: int

    @property
    def source(self) -> dict[str, Any]:
        return {
            "kind": "discord",
            "workspace": self.guild,
            "channel": self.channel,
            "user": self.user,
        }


def parse_interaction(body: bytes) -> dict[str, Any]:
    """The interaction object of a verified body."""
    try:
        interaction = json.loads(body)
    except ValueError:
        raise ChatRefusal("the interaction is not JSON") from None
    if not isinstance(interaction, dict):
        raise ChatRefusal("the interaction is not a JSON object")
    return interaction


def read_animate(interaction: dict[str, Any], *, max_bytes: int) -> AnimateRequest:
    """The ``/animate`` command of ``interaction``; ChatRefusal names what is wrong."""
    data = interaction.get("data") or {}
    if data.get("name") != "animate":
        raise ChatRefusal(f"unknown command {str(data.get('name'))[:40]!r}; try /animate")
    options = {opt.get("name"): opt.get("value") for opt in data.get("options") or []}
    prompt = str(options.get("prompt") or "").strip()
    if not prompt:
        raise ChatRefusal("prompt: describe what should happen in the video")
    if len(prompt) > MAX_PROMPT:
        raise ChatRefusal(f"prompt: at most {MAX_PROMPT} characters")
    model = options.get("model")
    if model is not None and model not in MODELS:
        raise ChatRefusal("model: one of " + ", ".join(MODELS))
    frames = options.get("frames")
    if frames is not None and (not isinstance(frames, int) or not 1 <= frames <= 25):
        raise ChatRefusal("frames: a whole number from 1 to 25")
    attachments = (data.get("resolved") or {}).get("attachments") or {}
    attachment = attachments.get(str(options.get("image"))) if options.get("image") else None
    if not attachment or not attachment.get("url"):
        raise ChatRefusal("image: attach the image to animate")
    content_type = str(attachment.get("content_type") or "")
    if not content_type.startswith("image/"):
        raise ChatRefusal(f"image: must be an image file, not {content_type or 'unknown type'}")
    size = int(attachment.get("size") or 0)
    if size > max_bytes:
        raise ChatRefusal(f"image: larger than {max_bytes} bytes")
    user = (interaction.get("member") or {}).get("user") or interaction.get("user") or {}
    return AnimateRequest(
        application_id=str(interaction.get("application_id") or ""),
        token=str(interaction.get("token") or ""),
        guild=interaction.get("guild_id"),
        channel=interaction.get("channel_id"),
        user=str(user.get("id") or ""),
        prompt=prompt,
        model=model,
        frames=frames,
        attachment_url=str(attachment["url"]),
        attachment_type=content_type,
        attachment_size=size,
    )


def ephemeral(content: str) -> dict[str, Any]:
    """An answer only the user who asked sees."""
    return {
        "type": CHANNEL_MESSAGE,
        "data": {"content": content, "flags": EPHEMERAL, "allowed_mentions": NO_MENTIONS},
    }


def deferred() -> dict[str, Any]:
    """Answer "thinking…" now; the result comes by editing ``@original``."""
    return {"type": DEFERRED_CHANNEL_MESSAGE}


def answer_interaction(
    services: Services, gate: ChatGate, http: requests.Session, body: bytes
) -> dict[str, Any]:
    """The answer to a verified interaction: PONG, deferred (a job is queued), or a refusal."""
    settings = services.settings
    try:
        interaction = parse_interaction(body)
        if interaction.get("type") == PING:
            return {"type": PONG}
        if interaction.get("type") != APPLICATION_COMMAND:
            raise ChatRefusal("this interaction is not supported; try /animate")
        command = read_animate(interaction, max_bytes=settings.max_upload_bytes)
        params: dict[str, Any] = {"prompt": command.prompt}
        if command.model:
            params["model_id"] = command.model
        if command.frames:
            params["num_frames"] = command.frames
        queue_chat_job(
            services,
            gate,
            http,
            source=command.source,
            image_url=command.attachment_url,
            origin="Discord",
            params=params,
            reply=discord_reply_target(command.application_id, command.token, command.channel),
        )
    except ChatRefusal as refusal:
        return ephemeral(f"Sorry, I cannot animate that: {refusal}")
    return deferred()


def register_commands(
    http: requests.Session,
    *,
    api_url: str,
    application_id: str,
    bot_token: str,
    guild: str | None = None,
) -> list[str]:
    """Overwrite the app's slash commands (in one guild: at once; global: within an hour)."""
    scope = f"/guilds/{guild}" if guild else ""
    url = f"{api_url}/applications/{application_id}{scope}/commands"
    response = http.put(
        url, json=[ANIMATE_COMMAND], headers={"Authorization": f"Bot {bot_token}"}, timeout=15
    )
    if response.status_code >= 300:
        raise ChatRefusal(f"Discord answered {response.status_code}: {response.text[:300]}")
    return [str(command.get("name")) for command in response.json()]
