"""Parsing untrusted JSON: bounded nesting, finite numbers only, no NUL characters.

Python's ``json`` accepts ``NaN``/``Infinity`` (and turns ``1e309`` into ``inf``),
recurses once per nesting level (about 1,000 levels end in ``RecursionError``),
and decodes ``\\u0000``. None of that may reach the database or an event: the
values are not JSON when written out again, and PostgreSQL ``text`` refuses NUL.
:func:`loads` refuses all three, naming where in the document the value was.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 64
NUL = "\x00"
NON_FINITE = "must be a finite number"
HAS_NUL = "must not contain NUL characters"

# A string (closed or not) or one bracket: only brackets outside strings count.
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]')
_OPENERS = frozenset((b"[", b"{"))


class JSONRejected(ValueError):
    """A JSON document we refuse; ``problems`` maps dotted paths to what is wrong there."""

    def __init__(self, message: str, problems: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.problems = problems or {}


class _NonFinite:
    """Stands in for a non-finite number until :func:`_problems` finds where it is."""


_NON_FINITE = _NonFinite()


def too_deep(data: bytes) -> bool:
    """Whether arrays and objects nest deeper than ``MAX_DEPTH`` in ``data``, without parsing.

    Brackets inside strings do not count. The scan is linear and recursion-free,
    so it is safe on any input; ``json`` can then parse a document known to be shallow.
    """
    if data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        return False  # the common case: too few brackets to nest that deep at all
    depth = 0
    for match in _TOKENS.finditer(data):
        token = match.group()
        if token in _OPENERS:
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif token[0] != 34:  # a closing bracket (34 is the quote that starts a string)
            depth -= 1
    return False


def _finite_float(text: str) -> float | _NonFinite:
    value = float(text)
    return value if math.isfinite(value) else _NON_FINITE


def _join(path: str, key: object) -> str:
    name = repr(key)[1:-1] if isinstance(key, str) else str(key)
    return f"{path}.{name}" if path else name


def _problems(value: Any, path: str, found: dict[str, str]) -> None:
    if value is _NON_FINITE:
        found[path] = NON_FINITE
    elif isinstance(value, str):
        if NUL in value:
            found[path] = HAS_NUL
    elif isinstance(value, dict):
        for key, item in value.items():
            child = _join(path, key)
            if NUL in key:
                found[child] = "name " + HAS_NUL
            _problems(item, child, found)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _problems(item, _join(path, index), found)


def loads(data: str | bytes) -> Any:
    """Parse ``data``; raise :class:`JSONRejected` for what we refuse, ``ValueError`` if invalid.

    Problems at a known place are listed in ``JSONRejected.problems`` by dotted
    path (``metadata.scores.0``); a problem with the document as a whole (too deep,
    or a bare ``NaN``) has an empty ``problems``.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if too_deep(raw):
        raise JSONRejected(f"body is nested deeper than {MAX_DEPTH} levels")
    value = json.loads(raw, parse_constant=lambda _name: _NON_FINITE, parse_float=_finite_float)
    found: dict[str, str] = {}
    _problems(value, "", found)
    if "" in found:
        reason = "non-finite number" if found[""] == NON_FINITE else "NUL character"
        raise JSONRejected(f"body is not valid JSON: {reason}")
    if found:
        message = "; ".join(f"{path}: {reason}" for path, reason in found.items())
        raise JSONRejected(message, found)
    return value


def find_problems(value: Any) -> dict[str, str]:
    """Non-finite floats and NUL characters in an already parsed value, by dotted path."""
    found: dict[str, str] = {}
    _problems(_mark_non_finite(value), "", found)
    return found


def _mark_non_finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return _NON_FINITE
    if isinstance(value, dict):
        return {key: _mark_non_finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_mark_non_finite(item) for item in value]
    return value
