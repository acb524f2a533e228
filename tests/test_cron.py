"""Cron expressions: fields, names, the day OR rule, and the next and latest slot in UTC."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import cron

UTC = dt.UTC


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("expression", "now", "expected"),
    [
        ("0 3 * * *", "2026-03-29 01:00", "2026-03-29 03:00"),
        ("0 3 * * *", "2026-03-29 03:00", "2026-03-30 03:00"),
        ("*/15 * * * *", "2026-01-01 10:07", "2026-01-01 10:15"),
        ("10-50/20 * * * *", "2026-01-01 10:31", "2026-01-01 10:50"),
        ("5/20 * * * *", "2026-01-01 10:46", "2026-01-01 11:05"),
        ("0 9-17 * * mon-fri", "2026-12-05 02:00", "2026-12-07 09:00"),
        ("0 0 1 jan,Jul *", "2026-02-01 00:00", "2026-07-01 00:00"),
        ("0 0 29 feb *", "2026-03-01 00:00", "2028-02-29 00:00"),
        # Both day fields restricted: the 13th OR a Friday.
        ("0 0 13 * fri", "2026-03-29 00:00", "2026-04-03 00:00"),
        # A day field starting with *: both must match (an odd day that is a Sunday).
        ("0 0 */2 * 0", "2026-01-01 00:00", "2026-01-11 00:00"),
        ("0 0 * * 7", "2026-12-05 12:00", "2026-12-06 00:00"),
        ("59 23 31 12 *", "2026-12-31 23:59", "2027-12-31 23:59"),
    ],
)
def test_the_next_slot(expression: str, now: str, expected: str) -> None:
    assert cron.parse(expression).next_after(at(now)) == at(expected)


def test_slots_are_computed_in_utc_whatever_zone_the_moment_is_given_in() -> None:
    berlin = dt.timezone(dt.timedelta(hours=2))
    now = dt.datetime(2026, 6, 1, 4, 30, tzinfo=berlin)  # 02:30 UTC

    assert cron.parse("0 3 * * *").next_after(now) == at("2026-06-01 03:00")
    assert cron.parse("0 3 * * *").latest_at_or_before(now) == at("2026-05-31 03:00")


def test_a_moment_without_a_zone_is_refused() -> None:
    with pytest.raises(ValueError, match="no time zone"):
        cron.parse("* * * * *").next_after(dt.datetime(2026, 1, 1))


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("* * *", "has 3 field(s); a cron expression has 5"),
        ("60 * * * *", "minute field '60': 60 is out of range (0-59)"),
        ("* 24 * * *", "hour field '24': 24 is out of range (0-23)"),
        ("* * 0 * *", "day of month field '0': 0 is out of range (1-31)"),
        ("* * * 13 *", "month field '13': 13 is out of range (1-12)"),
        ("* * * * 8", "day of week field '8': 8 is out of range (0-7)"),
        ("*/0 * * * *", "step '0' must be a whole number from 1 to 60"),
        ("*/99999999999999999999 * * * *", "step '99999999999999999999' must be a whole number"),
        ("* */25 * * *", "hour field '*/25': step '25' must be a whole number from 1 to 24"),
        ("5-1 * * * *", "range '5-1' runs backwards"),
        ("* * * foo *", "'foo' is not a number 1-12 or a name (jan, feb"),
        ("a * * * *", "'a' is not a number 0-59"),
        ("٣ * * * *", "is not a number 0-59"),
        ("0 0 30 feb *", "never comes: no day 30 in feb"),
        ("0 0 31 4,6 *", "never comes: no day 31 in apr, jun"),
    ],
)
def test_a_wrong_expression_says_which_field_and_why(expression: str, message: str) -> None:
    with pytest.raises(cron.CronError) as caught:
        cron.parse(expression)

    assert message in str(caught.value)


def test_feb_30_is_fine_when_a_weekday_may_also_match() -> None:
    parsed = cron.parse("0 0 30 2 mon")

    assert parsed.next_after(at("2026-01-01 00:00")) == at("2026-02-02 00:00")


FIELD = st.one_of(
    st.just("*"),
    st.builds(lambda step: f"*/{step}", st.integers(1, 20)),
    st.builds(lambda a, b: f"{min(a, b)}-{max(a, b)}", st.integers(0, 5), st.integers(0, 5)),
    st.lists(st.integers(0, 5), min_size=1, max_size=3).map(lambda xs: ",".join(map(str, xs))),
)


@st.composite
def expressions(draw: st.DrawFn) -> str:
    """Expressions dense enough that a window of days holds slots to compare."""
    minute = draw(st.one_of(FIELD, st.integers(0, 59).map(str)))
    hour = draw(st.one_of(st.just("*"), st.integers(0, 23).map(str), st.just("*/6")))
    day = draw(st.one_of(st.just("*"), st.just("1-15"), st.just("*/2"), st.just("13")))
    month = draw(st.one_of(st.just("*"), st.just("jan-jun"), st.just("*/3")))
    weekday = draw(st.one_of(st.just("*"), st.just("mon-fri"), st.just("0,6"), st.just("5")))
    return f"{minute} {hour} {day} {month} {weekday}"


MOMENTS = st.datetimes(min_value=dt.datetime(2020, 1, 1), max_value=dt.datetime(2040, 12, 31)).map(
    lambda moment: moment.replace(tzinfo=UTC)
)


@settings(max_examples=150, deadline=None)
@given(expressions(), MOMENTS)
def test_the_next_slot_is_later_matches_and_nothing_matches_before_it(
    text: str, now: dt.datetime
) -> None:
    parsed = cron.parse(text)
    slot = parsed.next_after(now)

    assert slot > now
    assert parsed.matches(slot)
    assert (slot.second, slot.microsecond) == (0, 0)
    # The latest slot at or before it is itself, and before it the one at or before now.
    assert parsed.latest_at_or_before(slot) == slot
    earlier = parsed.latest_at_or_before(slot - cron.MINUTE)
    assert earlier <= now


@settings(max_examples=60, deadline=None)
@given(expressions(), MOMENTS)
def test_stepping_from_slot_to_slot_skips_no_matching_minute(text: str, now: dt.datetime) -> None:
    parsed = cron.parse(text)
    start = now.replace(second=0, microsecond=0)
    end = start + dt.timedelta(days=3)

    brute = []
    minute = start + cron.MINUTE
    while minute <= end:
        if parsed.matches(minute):
            brute.append(minute)
        minute += cron.MINUTE
    stepped = []
    slot = parsed.next_after(now)
    while slot <= end:
        stepped.append(slot)
        slot = parsed.next_after(slot)

    assert stepped == brute


@settings(max_examples=100, deadline=None)
@given(expressions(), MOMENTS)
def test_the_latest_slot_is_at_or_before_now_and_the_next_one_is_after(
    text: str, now: dt.datetime
) -> None:
    parsed = cron.parse(text)
    latest = parsed.latest_at_or_before(now)

    assert latest <= now
    assert parsed.matches(latest)
    assert parsed.next_after(latest) > now
