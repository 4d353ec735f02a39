"""Aborting a request with the one JSON error shape."""

from __future__ import annotations

from typing import Any, NoReturn

from flask_smorest import abort as smorest_abort


def abort(code: int, message: str | None = None, **kwargs: Any) -> NoReturn:
    """Stop the request with ``code`` and a message that names the problem."""
    if message is not None:
        kwargs["message"] = message
    smorest_abort(code, **kwargs)
    raise AssertionError("unreachable: flask_smorest.abort raises")
