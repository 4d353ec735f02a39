"""The event log in a fixed order, for the events API and the live streams.

Every event has a position ``(txid, seq)`` that the database fills in (migration
0005): ``seq`` counts inserts and, on PostgreSQL, ``txid`` is the inserting
transaction. A reader must never be handed an event and later see another one
appear *before* it, or a cursor past the first would skip the second.

- SQLite has one writer at a time (``BEGIN IMMEDIATE``), so rows commit in
  ``seq`` order and every visible row is final (``txid`` stays 0).
- PostgreSQL commits concurrent transactions in any order. A row is *final* once
  every transaction older than the oldest one still running has ended: rows
  whose ``txid`` is below ``pg_snapshot_xmin`` of the reading statement's own
  snapshot can no longer be joined by rows in front of them. Readers take only
  those; a newer committed row waits (milliseconds, unless some transaction in
  the cluster stays open) until the transactions before it have ended.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Select, literal_column, select, tuple_
from sqlalchemy.orm import Session

from service.models import Event

Position = tuple[int, int]
# Before every event: txid and seq are never negative.
START: Position = (-1, -1)
SETTLE_STEP = 0.02
TERMINAL_TYPES = frozenset({"job.completed", "job.failed"})
# The oldest transaction id still running, as seen by the statement that reads.
HORIZON: ColumnElement[int] = literal_column(
    "pg_snapshot_xmin(pg_current_snapshot())::text::bigint", BigInteger()
)


@dataclass(frozen=True)
class LoggedEvent:
    """One event with its position in the log."""

    position: Position
    id: str
    project_id: str
    type: str
    job_id: str | None
    envelope: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES


@dataclass(frozen=True)
class Page:
    """Final events after a position, oldest first."""

    events: list[LoggedEvent]
    more: bool  # a full page: ask again at once
    held_back: bool  # newer rows are committed but not yet final: ask again shortly


def _columns(session: Session) -> Select[Any]:
    final = (Event.txid < HORIZON) if _postgresql(session) else literal_column("1")
    return select(
        Event.txid,
        Event.seq,
        Event.id,
        Event.project_id,
        Event.type,
        Event.job_id,
        Event.payload,
        final,
    ).order_by(Event.txid, Event.seq)


def as_position(txid: int, seq: int | None) -> Position:
    """A row's position (``seq`` is only ever NULL inside SQLite's insert trigger)."""
    assert seq is not None, "events.seq is filled in on insert"
    return (int(txid), int(seq))


def _postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def position_of(session: Session, project_id: str, event_id: str) -> Position | None:
    """The position of one of the project's events, or None if it has no such event."""
    row = session.execute(
        select(Event.txid, Event.seq).where(Event.id == event_id, Event.project_id == project_id)
    ).first()
    return as_position(*row) if row else None


def latest_position(session: Session) -> Position:
    """The position of the newest final event: what "from now on" starts after."""
    query = select(Event.txid, Event.seq).order_by(Event.txid.desc(), Event.seq.desc()).limit(1)
    if _postgresql(session):
        query = query.where(Event.txid < HORIZON)
    row = session.execute(query).first()
    return as_position(*row) if row else START


def read_after(
    session: Session,
    after: Position,
    *,
    limit: int,
    project_id: str | None = None,
    event_type: str | None = None,
    job_id: str | None = None,
    settle: float = 0.0,
) -> Page:
    """Final events after ``after`` (of one project, type or job), oldest first.

    With ``settle``, wait up to that many seconds for held-back events to become
    final (each statement sees a fresh snapshot), so a reader sees what was just
    committed unless some transaction stays open that long.
    """
    deadline = time.monotonic() + settle
    while True:
        page = _read(
            session, after, limit=limit, project_id=project_id, event_type=event_type, job_id=job_id
        )
        if not page.held_back or page.more or time.monotonic() >= deadline:
            return page
        time.sleep(SETTLE_STEP)


def _read(
    session: Session,
    after: Position,
    *,
    limit: int,
    project_id: str | None,
    event_type: str | None,
    job_id: str | None,
) -> Page:
    query = _columns(session).where(tuple_(Event.txid, Event.seq) > tuple_(*after))
    if project_id is not None:
        query = query.where(Event.project_id == project_id)
    if event_type is not None:
        query = query.where(Event.type == event_type)
    if job_id is not None:
        query = query.where(Event.job_id == job_id)
    events: list[LoggedEvent] = []
    held_back = False
    for txid, seq, event_id, project, kind, event_job, payload, final in session.execute(
        query.limit(limit + 1)
    ):
        if not final:
            held_back = True  # final rows all come before the first one that is not
            break
        position = as_position(txid, seq)
        events.append(LoggedEvent(position, event_id, project, kind, event_job, payload))
    more = len(events) > limit
    return Page(events[:limit], more=more, held_back=held_back)
