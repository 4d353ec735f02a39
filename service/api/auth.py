"""Bearer-token authentication for the client API."""

from __future__ import annotations

import hmac

from flask import request

from service.api.errors import abort
from service.extension import services


def token_is_valid(token: str) -> bool:
    """Whether ``token`` is one of the configured API tokens (constant time)."""
    valid = False
    for candidate in services().settings.api_tokens:
        valid |= hmac.compare_digest(candidate.encode(), token.strip().encode())
    return valid and bool(token.strip())


def require_token() -> None:
    """Reject the request unless it carries one of the configured bearer tokens."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not (scheme.lower() == "bearer" and token_is_valid(token)):
        abort(401, message="missing or invalid bearer token (Authorization: Bearer <token>)")


def current_token() -> str:
    return request.headers.get("Authorization", "").partition(" ")[2].strip()
