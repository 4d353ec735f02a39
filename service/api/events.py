"""``/v1/events``: catch up on what happened, or watch it live (``text/event-stream``)."""

from __future__ import annotations

from typing import Any, cast

from flask import Flask, Response, current_app, request
from flask_smorest import Blueprint
from sqlalchemy import select
from sqlalchemy.orm import Session

from schemas.events import EventListArgs, EventPageSchema, EventStreamArgs
from service.api.auth import client_project, owned, require_client
from service.api.errors import abort
from service.eventlog import (
    START,
    TERMINAL_TYPES,
    Position,
    as_position,
    position_of,
    read_after,
)
from service.extension import services
from service.models import Event, Job
from service.streams import Hub, StreamsFull

HUB = "motionhook.streams"
STREAM_RETRY_AFTER = "5"
# How long a list waits for just-committed events held back by older transactions.
LIST_SETTLE = 1.0
SECURITY: list[dict[str, list[str]]] = [{"bearer": []}]
LAST_EVENT_ID = {
    "in": "header",
    "name": "Last-Event-ID",
    "required": False,
    "schema": {"type": "string"},
    "description": "Resume after this event id (browsers' EventSource send it by themselves "
    "when they reconnect): nothing missed, nothing twice.",
}
STREAM_DOC: dict[str, Any] = {
    "security": SECURITY,
    "parameters": [LAST_EVENT_ID],
    "responses": {
        "200": {
            "description": "Server-Sent Events: `id:` event id, `event:` type, `data:` the "
            "envelope; a `: keep-alive` comment every 15 s",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        "503": {"description": "This process serves MOTIONHOOK_STREAMS_MAX streams already"},
    },
}

blp = Blueprint(
    "events",
    __name__,
    url_prefix="/v1",
    description="Events: catch up on what you missed, or stream them live",
)
blp.before_request(require_client)


def init_streams(app: Flask) -> None:
    """Give the app its (idle) stream hub; it starts following the log on the first stream."""
    settings = app.extensions["motionhook"].settings
    app.extensions[HUB] = Hub(
        app.extensions["motionhook"].db,
        max_streams=settings.streams_max,
        heartbeat=settings.stream_heartbeat,
    )


def hub() -> Hub:
    return cast(Hub, current_app.extensions[HUB])


def _position(
    session: Session, project_id: str, event_id: str, field: str, location: str
) -> Position:
    position = position_of(session, project_id, event_id)
    if position is None:
        message = f"no event {event_id}"
        abort(422, message=f"{field}: {message}", errors={location: {field: [message]}})
    return position


@blp.get("/events")
@blp.doc(security=SECURITY)
@blp.arguments(EventListArgs, location="query")
@blp.response(200, EventPageSchema)
def list_all(args: dict[str, Any]) -> dict[str, Any]:
    """List events oldest first, after the event id ``after`` (from the start without it)."""
    project_id = client_project()
    with services().db.transaction() as session:
        after = (
            _position(session, project_id, args["after"], "after", "query")
            if "after" in args
            else START
        )
        page = read_after(
            session,
            after,
            limit=args["limit"],
            project_id=client_project(),
            event_type=args.get("type"),
            job_id=args.get("job_id"),
            settle=LIST_SETTLE,
        )
    return {
        "items": [event.envelope for event in page.events],
        "next_cursor": page.events[-1].id if page.more else None,
    }


@blp.get("/events/stream")
@blp.doc(**STREAM_DOC)
@blp.arguments(EventStreamArgs, location="query")
def stream_all(args: dict[str, Any]) -> Response:
    """Stream events as they happen (optionally one type or one job's)."""
    return stream_events(client_project(), event_type=args.get("type"), job_id=args.get("job_id"))


@blp.get("/jobs/<string:job_id>/stream")
@blp.doc(**STREAM_DOC)
def stream_job(job_id: str) -> Response:
    """Stream one job's events from its first; the stream ends after job.completed or failed."""
    with services().db.transaction() as session:
        owned(session, Job, job_id, "job")
    return stream_job_events(client_project(), job_id)


def stream_events(project_id: str, *, event_type: str | None, job_id: str | None) -> Response:
    """The project's events as they happen, after the request's Last-Event-ID if it has one."""
    after = None
    last_event_id = request.headers.get("Last-Event-ID")
    if last_event_id:
        with services().db.transaction() as session:
            after = _position(session, project_id, last_event_id, "Last-Event-ID", "headers")
    return open_stream(
        project_id, after=after, event_type=event_type, job_id=job_id, until_terminal=False
    )


def stream_job_events(project_id: str, job_id: str) -> Response:
    """One job of the project (the caller checked), from its first event (or after
    Last-Event-ID) to its last."""
    after = START
    last_event_id = request.headers.get("Last-Event-ID")
    with services().db.transaction() as session:
        if last_event_id:
            after = _position(session, project_id, last_event_id, "Last-Event-ID", "headers")
        terminal = session.execute(
            select(Event.txid, Event.seq)
            .where(Event.job_id == job_id, Event.type.in_(TERMINAL_TYPES))
            .order_by(Event.txid, Event.seq)
            .limit(1)
        ).first()
    if terminal is not None and as_position(*terminal) <= after:
        return _sse_response(iter(()))  # the client has seen the end already
    return open_stream(project_id, after=after, event_type=None, job_id=job_id, until_terminal=True)


def open_stream(
    project_id: str,
    *,
    after: Position | None,
    event_type: str | None,
    job_id: str | None,
    until_terminal: bool,
) -> Response:
    """A stream of the project's events (see service.streams), or 503 past the bound."""
    streams = hub()
    try:
        subscriber = streams.open(project_id, event_type=event_type, job_id=job_id)
    except StreamsFull as exc:
        abort(503, message=f"{exc}; retry shortly", headers={"Retry-After": STREAM_RETRY_AFTER})
    response = _sse_response(streams.events(subscriber, after=after, until_terminal=until_terminal))
    # Runs even when the body is never iterated (a client gone before the first byte).
    response.call_on_close(lambda: streams.close(subscriber))
    return response


def _sse_response(body: Any) -> Response:
    return Response(
        body,
        mimetype="text/event-stream",
        # Proxies (nginx) must pass each message on at once, not buffer the stream.
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
