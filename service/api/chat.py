"""``/v1/chat/…``: the endpoints Slack and Discord call (signed by them, no bearer token)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import requests
from flask import Response, current_app, request
from flask_smorest import Blueprint

from service.api.errors import abort
from service.chat import discord, slack
from service.chat.common import BadSignature, ChatGate
from service.extension import services
from service.outbound import make_session

blp = Blueprint("chat", __name__, url_prefix="/v1/chat", description="Slack and Discord apps")


def _chat_tools() -> tuple[ChatGate, requests.Session]:
    """The app's chat gate and its session for chat downloads, made on first use."""
    tools: tuple[ChatGate, requests.Session] | None = current_app.extensions.get("motionhook_chat")
    if tools is None:
        settings = services().settings
        tools = (
            ChatGate.from_settings(settings),
            make_session(allow_private=settings.allow_private_targets),
        )
        current_app.extensions["motionhook_chat"] = tools
    return tools


def _signed_body(
    key: str | None, app: str, setting: str, verify: Callable[[str, Mapping[str, str], bytes], None]
) -> bytes:
    """The raw body, checked with ``verify`` before anything reads it.

    404 naming ``setting`` when the app is not configured, 401 when badly signed.
    """
    if not key:
        abort(404, message=f"the {app} app is not configured: set {setting}")
    body = request.get_data(cache=False)
    try:
        verify(key, {name.lower(): value for name, value in request.headers.items()}, body)
    except BadSignature as exc:
        abort(401, message=str(exc))
    return body


@blp.post("/discord/interactions")
@blp.doc(security=[])
@blp.alt_response(401, description="Not signed with MOTIONHOOK_DISCORD_PUBLIC_KEY")
@blp.alt_response(404, description="The Discord app is not configured")
def discord_interactions() -> dict[str, Any]:
    """Answer a Discord interaction (PING, or the ``/animate`` command)."""
    key = services().settings.discord_public_key
    body = _signed_body(key, "Discord", "MOTIONHOOK_DISCORD_PUBLIC_KEY", discord.verify)
    gate, http = _chat_tools()
    return discord.answer_interaction(services(), gate, http, body)


def _slack_body() -> bytes:
    key = services().settings.slack_signing_secret
    return _signed_body(key, "Slack", "MOTIONHOOK_SLACK_SIGNING_SECRET", slack.verify)


@blp.post("/slack/commands")
@blp.doc(security=[])
@blp.alt_response(401, description="Not signed with MOTIONHOOK_SLACK_SIGNING_SECRET")
@blp.alt_response(404, description="The Slack app is not configured")
def slack_commands() -> dict[str, Any]:
    """Answer the ``/animate <image URL> <prompt>`` slash command (an ephemeral message)."""
    body = _slack_body()
    gate, http = _chat_tools()
    return slack.answer_command(services(), gate, http, body)


@blp.post("/slack/interactions")
@blp.doc(security=[])
@blp.alt_response(401, description="Not signed with MOTIONHOOK_SLACK_SIGNING_SECRET")
@blp.alt_response(404, description="The Slack app is not configured")
def slack_interactions() -> Response:
    """Handle the "Animate this image" message shortcut (callback id ``animate_image``)."""
    body = _slack_body()
    gate, http = _chat_tools()
    slack.answer_interaction(services(), gate, http, body)
    return Response(status=200)
