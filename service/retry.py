"""Retry timing, written once: jittered schedules, ``Retry-After``, outage backoff.

Upstream submits, output downloads and deliveries all wait between attempts by
a :class:`Schedule`; what a server asks for (a ``Retry-After`` header in seconds
or as an HTTP date, or a JSON ``retry_after`` field as Discord and ModelsLab
send it) is read by :func:`retry_after_header` and :func:`retry_after_field`.
:class:`Backoff` is the capped exponential wait of a process riding out an
outage of something it depends on (the database).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

JITTER = 0.2
# A server cannot push a retry further out than this.
MAX_RETRY_AFTER = 24 * 3600.0


@dataclass(frozen=True)
class Schedule:
    """Delays between attempts: item ``n`` is the wait after attempt ``n``, ±20% jitter.

    ``give_up`` schedules end (deliveries: after the last item the delivery fails);
    others repeat their last item for ever (upstream submits and downloads are
    bounded by job deadlines instead).
    """

    delays: tuple[float, ...]
    give_up: bool = True

    def delay(
        self, attempts: int, *, retry_after: float | None = None, rng: random.Random | None = None
    ) -> float | None:
        """Seconds to wait after ``attempts`` attempts (1-based), or None to stop trying."""
        if attempts < 1:
            raise ValueError("attempts counts attempts already made and starts at 1")
        if not self.delays or (self.give_up and attempts > len(self.delays)):
            return None
        base = self.delays[min(attempts, len(self.delays)) - 1]
        delay = base * (rng or random).uniform(1 - JITTER, 1 + JITTER)
        return max(delay, retry_after) if retry_after is not None else delay


def _seconds(value: Any) -> float | None:
    """``value`` as a finite, non-negative number of seconds, or None."""
    if isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return min(seconds, MAX_RETRY_AFTER) if math.isfinite(seconds) and seconds >= 0 else None


def retry_after_header(value: str | None, now: datetime | None = None) -> float | None:
    """Read a ``Retry-After`` value: delay seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    seconds = _seconds(value.strip())
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return _seconds(max(0.0, (when - now).total_seconds()))


def retry_after_field(payload: Mapping[str, Any] | None) -> float | None:
    """Read a JSON body's ``retry_after`` (Discord's 429s, ModelsLab's queue limit)."""
    return _seconds(payload.get("retry_after")) if payload else None


class Backoff:
    """Capped exponential waits, 0.2 s doubling to 5 s, measured by the outage's age.

    Each wait is as long as the outage has lasted so far (at least ``first``, at most
    ``cap``): one caller that waits and tries again sees 0.2, 0.2, 0.4, 0.8, ... s, and
    many threads reporting the same outage do not push each other to the cap.
    """

    def __init__(
        self, first: float = 0.2, cap: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.first = first
        self.cap = cap
        self.clock = clock
        self.started: float | None = None

    @property
    def failing(self) -> bool:
        return self.started is not None

    def next(self) -> float:
        """Record a failure and return how long to wait before trying again."""
        now = self.clock()
        if self.started is None:
            self.started = now
        return min(self.cap, max(self.first, now - self.started))

    def reset(self) -> bool:
        """Record a success; return whether it ended a run of failures."""
        failed, self.started = self.started is not None, None
        return failed
