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

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

from flask import Flask, Response, g
from flask_smorest import abort as smorest_abort
from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException, ServiceUnavailable

from service.db import Database, is_unavailable

DATABASE_UNAVAILABLE = "database unavailable, retry shortly"
RETRY_AFTER_SECONDS = 2
# The classes a "database unavailable" error can come as; is_unavailable decides.
DATABASE_ERRORS = (OperationalError, InterfaceError, DisconnectionError, PoolTimeout)
UNAVAILABLE_FLAG = "motionhook_database_unavailable"

logger = logging.getLogger("motionhook.api")


def abort(code: int, message: str | None = None, **kwargs: Any) -> NoReturn:
    """Stop the request with ``code`` and a message that names the problem."""
    if message is not None:
        kwargs["message"] = message
    smorest_abort(code, **kwargs)
    raise AssertionError("unreachable: flask_smorest.abort raises")


class DatabaseOutage:
    """Whether this process is in a database outage; logs its start and end once each."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._since: float | None = None

    def failed(self, error: BaseException) -> None:
        """A request met the outage: log it if it is the first to."""
        with self._lock:
            if self._since is not None:
                return
            self._since = self.clock()
        cause = getattr(error, "orig", None) or error
        logger.warning(
            "database unavailable; answering 503 until it answers again",
            extra={"error": type(cause).__name__, "detail": str(cause).splitlines()[0][:200]},
        )

    def answered(self) -> None:
        """A statement succeeded: an outage in progress is over."""
        if self._since is None:  # the usual case, decided without the lock
            return
        with self._lock:
            since, self._since = self._since, None
        if since is not None:
            logger.info(
                "database answers again",
                extra={"outage_seconds": round(self.clock() - since, 3)},
            )


def register_database_errors(
    app: Flask, db: Database, render: Callable[[HTTPException], Any]
) -> None:
    """Answer 503 (rendered by ``render``, the API's error handler) while ``db`` is away.

    Call this before the rate limiter is attached: its hook then runs after the
    limiter's, which stamps its own window on every ``Retry-After``.
    """
    outage = DatabaseOutage()

    @event.listens_for(db.engine, "after_cursor_execute")
    def _answered(*_args: Any) -> None:
        outage.answered()

    def database_unavailable(error: Exception) -> Any:
        if not is_unavailable(error):
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
        app.register_error_handler(error_class, database_unavailable)
    app.after_request(retry_shortly)
