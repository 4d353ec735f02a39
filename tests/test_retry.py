"""Retry timing: jittered schedules, Retry-After in both forms, outage backoff."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from service.config import DEFAULT_RETRY_SCHEDULE, ConfigError, parse_retry_schedule
from service.retry import MAX_RETRY_AFTER, Backoff, Schedule, retry_after_field, retry_after_header

DEFAULT = parse_retry_schedule(DEFAULT_RETRY_SCHEDULE)
NOW = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)


def test_delay_is_jittered_within_twenty_percent() -> None:
    rng = random.Random(1234)
    for attempt, base in enumerate(DEFAULT, start=1):
        draws = [Schedule(DEFAULT).delay(attempt, rng=rng) for _ in range(500)]
        values = [draw for draw in draws if draw is not None]
        assert len(values) == 500
        assert all(0.8 * base <= value <= 1.2 * base for value in values)
        # The jitter is really spread over the range, not a constant.
        assert min(values) < 0.85 * base
        assert max(values) > 1.15 * base


def test_retry_after_wins_when_larger_than_the_schedule() -> None:
    rng = random.Random(5)

    assert Schedule((5.0,)).delay(1, retry_after=600.0, rng=rng) == 600.0
    delay = Schedule((300.0,)).delay(1, retry_after=2.0, rng=rng)
    assert delay is not None and 240.0 <= delay <= 360.0


def test_a_schedule_that_gives_up_ends_and_one_that_does_not_repeats_its_last_delay() -> None:
    rng = random.Random(0)

    assert Schedule(DEFAULT).delay(7, rng=rng) is not None
    assert Schedule(DEFAULT).delay(8, rng=rng) is None
    assert Schedule(()).delay(1, retry_after=30.0, rng=rng) is None
    endless = Schedule((1.0, 60.0), give_up=False)
    assert all(48.0 <= (endless.delay(n, rng=rng) or 0) <= 72.0 for n in range(2, 50))
    with pytest.raises(ValueError):
        Schedule(DEFAULT).delay(0, rng=rng)


def test_parse_retry_schedule() -> None:
    assert DEFAULT == (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
    assert parse_retry_schedule(" 0.5 , 10 ") == (0.5, 10.0)
    assert parse_retry_schedule([1, "2"]) == (1.0, 2.0)
    assert parse_retry_schedule(5) == (5.0,)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("5,abc,10", "item 2 ('abc')"),
        ("5,,10", "item 2 ('')"),
        ("-1", "item 1 ('-1')"),
        ("5,inf", "item 2 ('inf')"),
        ("", "empty"),
    ],
)
def test_parse_retry_schedule_names_the_bad_item(text: str, named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_retry_schedule(text)

    assert named in str(caught.value)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 1.5 ", 1.5),
        (format_datetime(NOW + timedelta(seconds=90), usegmt=True), 90.0),
        (format_datetime(NOW - timedelta(seconds=90), usegmt=True), 0.0),
        ("999999999", MAX_RETRY_AFTER),
        ("-3", None),
        ("soon", None),
        ("nan", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_header_reads_seconds_and_http_dates(
    value: str | None, seconds: float | None
) -> None:
    assert retry_after_header(value, NOW) == seconds


def test_retry_after_field_reads_numbers_only() -> None:
    assert retry_after_field({"retry_after": 30}) == 30.0
    assert retry_after_field({"retry_after": 0.25}) == 0.25
    assert retry_after_field({"retry_after": True}) is None
    assert retry_after_field({"retry_after": "later"}) is None
    assert retry_after_field({}) is None
    assert retry_after_field(None) is None


def test_backoff_waits_as_long_as_the_outage_has_lasted_from_a_fifth_of_a_second_to_five() -> None:
    now = [100.0]
    backoff = Backoff(clock=lambda: now[0])
    waits = []
    for _ in range(8):
        waits.append(backoff.next())
        now[0] += waits[-1]  # one caller: waits, then tries again
    assert waits == pytest.approx([0.2, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
    assert backoff.reset() is True
    assert backoff.reset() is False
    # Many threads reporting the same outage at once do not lengthen it.
    assert [backoff.next() for _ in range(5)] == [0.2] * 5
