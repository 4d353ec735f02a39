"""Refusing hostile input at the edge: NUL characters, non-finite numbers, deep nesting.

Request JSON is parsed by :mod:`schemas.strict_json` (the app's JSON provider),
so ``request.get_json`` never yields ``NaN``, ``Infinity``, a NUL or a document
deep enough to exhaust the stack. A JSON body is parsed once before the view
runs, after the blueprint's own checks (authentication: an anonymous client
never makes us read a body): flask-smorest's argument parser reads the raw body
with the standard ``json`` module, which is safe once the same bytes passed
here. Callbacks are left alone until their signature is checked (their view
parses strictly itself).
"""

from __future__ import annotations

from typing import Any

from flask import Flask, request
from flask.json.provider import DefaultJSONProvider

from schemas.strict_json import NUL, JSONRejected, loads
from service.api.errors import abort

# Blueprints that read their body themselves, after authenticating it.
RAW_BODY_BLUEPRINTS = frozenset({"callbacks"})


class StrictJSONProvider(DefaultJSONProvider):
    """Flask's JSON provider, parsing with :func:`schemas.strict_json.loads`."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            return loads(s)
        except JSONRejected as exc:
            # Not a ValueError on the way out: get_json(silent=True) must not swallow it.
            if exc.problems:
                errors = {path: [reason] for path, reason in exc.problems.items()}
                abort(422, message=exc.message, errors={"json": errors})
            abort(400, message=exc.message)


def refuse_hostile_input() -> None:
    """Answer 400 for a NUL in the path, the query or a header."""
    if NUL in request.path:
        abort(400, message="path must not contain NUL characters")
    for name, value in request.args.items(multi=True):
        if NUL in name or NUL in value:
            label = name.replace(NUL, "\\x00")
            abort(
                400,
                message=f"query parameter {label}: must not contain NUL characters",
                errors={"query": {label: ["must not contain NUL characters"]}},
            )
    for name, value in request.headers.items():
        if NUL in value:
            abort(400, message=f"header {name}: must not contain NUL characters")


def refuse_hostile_json() -> None:
    """Parse a JSON body strictly (4xx for what it refuses); views get it from the cache."""
    if request.is_json:
        request.get_json(silent=True)


def init_app(app: Flask) -> None:
    """Install the strict JSON provider and the checks; call after registering blueprints."""
    app.json = StrictJSONProvider(app)
    app.before_request(refuse_hostile_input)
    for name in app.blueprints:
        if name not in RAW_BODY_BLUEPRINTS:
            # Blueprint hooks run after the app's, in order: this one after authentication.
            app.before_request_funcs.setdefault(name, []).append(refuse_hostile_json)
