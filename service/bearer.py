"""Bearer tokens: reading the ``Authorization`` header, comparing and hashing tokens.

The one place that parses ``Authorization: Bearer …`` and compares a presented
token with configured ones: client auth, rate-limit keys and both ``/metrics``
endpoints use it. No Flask here: the worker's metrics server uses it too.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def is_one_of(token: str, candidates: Iterable[str]) -> bool:
    """Whether ``token`` equals one of ``candidates``, in time independent of which."""
    presented = token.encode()
    found = False
    for candidate in candidates:
        found |= hmac.compare_digest(candidate.encode(), presented)
    return found


def token_hash(token: str) -> str:
    """The SHA-256 (hex) a token is stored and looked up by.

    A plain hash is right here: the tokens are 256 random bits, not passwords, so
    there is nothing for a slow hash to protect against.
    """
    return hashlib.sha256(token.encode()).hexdigest()
