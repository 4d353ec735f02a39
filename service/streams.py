"""Live event streams (Server-Sent Events) fed by one follower of the event log per process.

Each web process has one :class:`Hub`. While streams are open, its single
thread (a greenlet under gunicorn's gevent workers) follows the event log
(:mod:`service.eventlog`) and hands every new final event to each stream's
queue: on PostgreSQL it wakes on ``LISTEN`` (every event's transaction sends
``NOTIFY`` on the worker wake-up channel when it commits); on SQLite, which
cannot signal another process, it reads the table every ``SQLITE_POLL``
seconds. One connection per process, however many streams.

A stream first replays what it missed from the database (after its
``Last-Event-ID``) up to the position where its hub registration began, then
takes the hub's events after that position, so nothing is missed or repeated;
several processes (or machines) agree because positions come from the database.
"""

from __future__ import annotations

import logging
import queue
import select
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from sqlalchemy.exc import SQLAlchemyError

from service.db import WAKEUP_CHANNEL, Database
from service.eventlog import LoggedEvent, Position, latest_position, read_after
from service.notifiers.webhook import serialize

log = logging.getLogger(__name__)

SQLITE_POLL = 0.2  # seconds; see docs/performance.md for what it costs
HELD_BACK_RETRY = 0.05  # a committed event waits for older transactions to end
SAFETY_CHECK = 5.0  # read the log now and then even without a NOTIFY
RECONNECT_DELAY = 1.0
PAGE = 500
# A stream this far behind is closed; its client reconnects with Last-Event-ID.
MAX_QUEUED = 10_000
RETRY_MS = 1000  # how soon an EventSource reconnects after the stream ends


# Every hub of this process that has started, for stop_streams (one per app).
STARTED_HUBS: list[Hub] = []


class StreamsFull(Exception):
    """This process already serves its maximum number of streams (or is stopping)."""


def stop_streams() -> None:
    """End every open stream of this process now (gunicorn calls it on SIGTERM).

    Streams never finish by themselves, so a stopping worker would otherwise wait
    out its whole graceful timeout; their clients reconnect with Last-Event-ID.
    Safe in a signal handler: it takes no lock.
    """
    for hub in STARTED_HUBS:
        hub.stop()


@dataclass(eq=False)
class Subscriber:
    """One open stream's registration: its start position and its queue of live events."""

    start: Position
    project_id: str
    event_type: str | None
    job_id: str | None
    queue: queue.SimpleQueue[LoggedEvent | None] = field(default_factory=queue.SimpleQueue)
    overflowed: bool = False

    def offer(self, event: LoggedEvent) -> None:
        if self.overflowed or event.project_id != self.project_id:
            return
        if self.event_type is not None and event.type != self.event_type:
            return
        if self.job_id is not None and event.job_id != self.job_id:
            return
        if self.queue.qsize() >= MAX_QUEUED:
            self.overflowed = True
            self.queue.put(None)  # the stream ends; the client resumes from the database
            return
        self.queue.put(event)


class Hub:
    """Follows the event log for every stream of this process."""

    def __init__(self, db: Database, *, max_streams: int, heartbeat: float) -> None:
        self.db = db
        self.max_streams = max_streams
        self.heartbeat = heartbeat
        self.lock = threading.Lock()
        self.subscribers: set[Subscriber] = set()
        # The last event handed to the subscribers; None while nobody listens.
        self.position: Position | None = None
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.stopping = False

    # -- streams -------------------------------------------------------

    def open(
        self, project_id: str, *, event_type: str | None = None, job_id: str | None = None
    ) -> Subscriber:
        """Register a stream of the project's events from now on, or raise StreamsFull."""
        with self.lock:
            if self.stopping:
                raise StreamsFull("this process is stopping")
            if len(self.subscribers) >= self.max_streams:
                raise StreamsFull(f"{self.max_streams} streams are open in this process")
            if self.position is None:
                with self.db.transaction() as session:
                    self.position = latest_position(session)
            subscriber = Subscriber(self.position, project_id, event_type, job_id)
            self.subscribers.add(subscriber)
            if self.thread is None:
                # Started here, not in create_app: gunicorn may fork after create_app.
                self.thread = threading.Thread(target=self._run, name="event-hub", daemon=True)
                self.thread.start()
                STARTED_HUBS.append(self)
        self.wake.set()
        return subscriber

    def close(self, subscriber: Subscriber) -> None:
        with self.lock:
            self.subscribers.discard(subscriber)
            if not self.subscribers:
                self.position = None  # stop following; the next open starts afresh

    def stop(self) -> None:
        """End every stream and refuse new ones (lock-free: see stop_streams)."""
        self.stopping = True
        while True:
            try:
                subscribers = list(self.subscribers)
                break
            except RuntimeError:  # the set changed while being copied
                continue
        for subscriber in subscribers:
            subscriber.queue.put(None)  # SimpleQueue.put is reentrant

    def events(
        self, subscriber: Subscriber, *, after: Position | None, until_terminal: bool
    ) -> Iterator[str]:
        """The stream's text: what it missed since ``after``, then live events, with comments."""
        yield f"retry: {RETRY_MS}\n\n"
        last = subscriber.start if after is None else after
        for event in self._backlog(subscriber, last):
            yield format_event(event)
            last = event.position
            if until_terminal and event.terminal:
                return
        while True:
            try:
                item = subscriber.queue.get(timeout=self.heartbeat)
            except queue.Empty:
                yield ": keep-alive\n\n"
                continue
            if item is None:
                return
            if item.position <= last:
                continue  # the client saw it already (from another process, say)
            yield format_event(item)
            last = item.position
            if until_terminal and item.terminal:
                return

    def _backlog(self, subscriber: Subscriber, after: Position) -> Iterator[LoggedEvent]:
        """Events after ``after`` up to the subscriber's start, read from the database."""
        while after < subscriber.start:
            with self.db.transaction() as session:
                page = read_after(
                    session,
                    after,
                    limit=PAGE,
                    project_id=subscriber.project_id,
                    event_type=subscriber.event_type,
                    job_id=subscriber.job_id,
                )
            for event in page.events:
                if event.position > subscriber.start:
                    return  # the live queue has this one
                yield event
                after = event.position
            if not page.more:
                return

    # -- following the log ---------------------------------------------

    def _run(self) -> None:
        if self.db.is_sqlite:
            self._poll()
        else:
            self._listen()

    def _catch_up(self) -> bool:
        """Hand every new final event to the subscribers; True if some are held back."""
        with self.lock:
            position = self.position
        while position is not None:
            with self.db.transaction() as session:
                page = read_after(session, position, limit=PAGE)
            with self.lock:
                if self.position != position:
                    return False  # everyone left meanwhile (and maybe someone came back)
                for event in page.events:
                    for subscriber in self.subscribers:
                        subscriber.offer(event)
                if page.events:
                    self.position = page.events[-1].position
                position = self.position
            if not page.more:
                return page.held_back
        return False

    def _poll(self) -> None:
        while True:
            with self.lock:
                idle = not self.subscribers
            if idle:
                self.wake.wait()
            self.wake.clear()
            try:
                self._catch_up()
            except SQLAlchemyError:
                log.warning("event streams could not read the event log; retrying")
            self.wake.wait(SQLITE_POLL)

    def _listen(self) -> None:
        import psycopg  # PostgreSQL only: SQLite processes never load it

        conninfo = self.db.engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False
        )
        while True:
            try:
                with psycopg.connect(conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {WAKEUP_CHANNEL}")
                    held_back = self._catch_up()
                    while True:
                        timeout = HELD_BACK_RETRY if held_back else SAFETY_CHECK
                        # Wait for the first notification (select is cooperative under
                        # gevent), then drain every one that came with it.
                        select.select([conn.fileno()], [], [], timeout)
                        for _ in conn.notifies(timeout=0.0):
                            pass  # drain: one read of the log serves them all
                        held_back = self._catch_up()
            except (psycopg.Error, SQLAlchemyError):
                log.warning("event streams lost the database; reconnecting")
                time.sleep(RECONNECT_DELAY)


def format_event(event: LoggedEvent) -> str:
    """One SSE message: ``id`` = event id, ``event`` = type, ``data`` = the envelope."""
    return f"id: {event.id}\nevent: {event.type}\ndata: {serialize(event.envelope)}\n\n"
