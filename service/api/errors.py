"""The one JSON error shape: aborting a request, and 503 while the database is away.

A database that cannot be reached (PostgreSQL refusing or dropping connections,
a pool with no free connection, SQLite's ``database is locked``) is not a bug of
this service: every endpoint then answers 503 with ``Retry-After``, the outage is
logged once per process (one WARNING, then nothing until a statement succeeds
again), and nothing reaches Sentry. Every other database error (an integrity
error, a missing table) stays what it is: an unhandled exception, a 500, and a
Sentry event.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from flask import Flask, Response, g
from flask_smorest import abort as smorest_abort
from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException, ServiceUnavailable

from service.db import Database, Outage, database_unavailable

DATABASE_UNAVAILABLE = "database unavailable, retry shortly"
ANSWERING_503 = "answering 503 until it answers again"
RETRY_AFTER_SECONDS = 2
# The classes a "database unavailable" error can come as; database_unavailable decides.
DATABASE_ERRORS = (OperationalError, InterfaceError, DisconnectionError, PoolTimeout)
UNAVAILABLE_FLAG = "motionhook_database_unavailable"


def abort(code: int, message: str | None = None, **kwargs: Any) -> NoReturn:
    """Stop the request with ``code`` and a message that names the problem."""
    if message is not None:
        kwargs["message"] = message
    smorest_abort(code, **kwargs)
    raise AssertionError("unreachable: flask_smorest.abort raises")


def register_database_errors(
    app: Flask, db: Database, render: Callable[[HTTPException], Any]
) -> None:
    """Answer 503 (rendered by ``render``, the API's error handler) while ``db`` is away.

    Call this before the rate limiter is attached: its hook then runs after the
    limiter's, which stamps its own window on every ``Retry-After``.
    """
    outage = Outage(consequence=ANSWERING_503)

    @event.listens_for(db.engine, "after_cursor_execute")
    def _answered(*_args: Any) -> None:
        outage.recovered()

    def unavailable_answer(error: Exception) -> Any:
        if not database_unavailable(error):
            raise error  # a bug, not an outage: a 500 and a Sentry event, as unhandled
        outage.failed(error)
        setattr(g, UNAVAILABLE_FLAG, True)
        unavailable = ServiceUnavailable()
        unavailable.data = {"message": DATABASE_UNAVAILABLE}  # type: ignore[attr-defined]
        return render(unavailable)

    def retry_shortly(response: Response) -> Response:
        if g.get(UNAVAILABLE_FLAG):
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response

    for error_class in DATABASE_ERRORS:
        app.register_error_handler(error_class, unavailable_answer)
    app.after_request(retry_shortly)
