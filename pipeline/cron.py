"""Cron expressions of five fields (minute hour day-of-month month day-of-week), read in UTC.

Each field takes `*`, numbers, ranges (`1-5`), lists (`1,3,5`) and steps (`*/15`, `10-50/20`,
`5/10`); months and days of the week also take their English names (`jan`, `mon-fri`). As in
Vixie cron, when both day fields are restricted a day matches if either does; when one of them
starts with `*` both must match. Sunday is 0 or 7.
"""

from __future__ import annotations

import calendar
import datetime as dt
from dataclasses import dataclass

MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# (name, lowest, highest, names whose position plus `lowest` is their number)
FIELDS = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, MONTHS),
    ("day of week", 0, 7, DAYS),
)
# How far to look for a matching minute: Feb 29 on a given weekday can be 28 years away.
SEARCH_YEARS = 29
MINUTE = dt.timedelta(minutes=1)


class CronError(ValueError):
    """An expression that is not five valid fields; the message says which field and why."""


@dataclass(frozen=True)
class Cron:
    """A parsed expression: the set of values each field allows."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Monday, as datetime.weekday() counts
    # Whether each day field was restricted (did not start with `*`): decides the OR rule.
    days_restricted: bool
    weekdays_restricted: bool

    def matches(self, moment: dt.datetime) -> bool:
        """Whether the minute of `moment` (in UTC) is a slot of this expression."""
        moment = _utc(moment)
        return (
            moment.minute in self.minutes
            and moment.hour in self.hours
            and moment.month in self.months
            and self._day_matches(moment)
        )

    def next_after(self, moment: dt.datetime) -> dt.datetime:
        """The first slot strictly after `moment`, in UTC."""
        start = _utc(moment).replace(second=0, microsecond=0) + MINUTE
        at = start
        while at.year <= start.year + SEARCH_YEARS:
            if at.month not in self.months:
                at = _first_of_next_month(at)
            elif not self._day_matches(at):
                at = at.replace(hour=0, minute=0) + dt.timedelta(days=1)
            elif at.hour not in self.hours:
                at = at.replace(minute=0) + dt.timedelta(hours=1)
            elif at.minute not in self.minutes:
                at += MINUTE
            else:
                return at
        raise CronError(f"{self.text!r} has no slot in the {SEARCH_YEARS} years after {start}")

    def latest_at_or_before(self, moment: dt.datetime) -> dt.datetime:
        """The last slot at or before `moment` (its minute counts), in UTC."""
        start = _utc(moment).replace(second=0, microsecond=0)
        at = start
        while at.year >= start.year - SEARCH_YEARS:
            if at.month not in self.months:
                at = at.replace(day=1, hour=0, minute=0) - MINUTE
            elif not self._day_matches(at):
                at = at.replace(hour=0, minute=0) - MINUTE
            elif at.hour not in self.hours:
                at = at.replace(minute=0) - MINUTE
            elif at.minute not in self.minutes:
                at -= MINUTE
            else:
                return at
        raise CronError(f"{self.text!r} has no slot in the {SEARCH_YEARS} years before {start}")

    def _day_matches(self, moment: dt.datetime) -> bool:
        day = moment.day in self.days
        weekday = moment.weekday() in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return day or weekday
        return day and weekday


def parse(text: str) -> Cron:
    """Read a five-field expression; a CronError names the field that is wrong."""
    fields = text.split()
    if len(fields) != 5:
        message = (
            f"{text!r} has {len(fields)} field(s); a cron expression has 5:"
            " minute hour day-of-month month day-of-week"
        )
        raise CronError(message)
    values = [_field(raw, *spec) for raw, spec in zip(fields, FIELDS, strict=True)]
    # cron counts Sunday as 0 (or 7), datetime.weekday() as 6.
    weekdays = frozenset((day - 1) % 7 for day in values[4])
    cron = Cron(
        text=text,
        minutes=values[0],
        hours=values[1],
        days=values[2],
        months=values[3],
        weekdays=weekdays,
        days_restricted=not fields[2].startswith("*"),
        weekdays_restricted=not fields[4].startswith("*"),
    )
    if not _some_day_exists(cron):
        months = ", ".join(MONTHS[m - 1] for m in sorted(cron.months))
        days = ", ".join(str(d) for d in sorted(cron.days))
        raise CronError(f"{text!r} never comes: no day {days} in {months}")
    return cron


def _field(raw: str, name: str, low: int, high: int, names: tuple[str, ...]) -> frozenset[int]:
    found: set[int] = set()
    for part in raw.split(","):
        where = f"{name} field {raw!r}"
        span, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if (
                not step_text.isdigit()
                or not step_text.isascii()
                or not 1 <= int(step_text) <= high - low + 1
            ):
                raise CronError(
                    f"{where}: step {step_text!r} must be a whole number from 1 to {high - low + 1}"
                )
            step = int(step_text)
        if span == "*":
            first, last = low, high
        elif "-" in span:
            start, _, end = span.partition("-")
            first = _value(start, where, low, high, names)
            last = _value(end, where, low, high, names)
            if first > last:
                raise CronError(f"{where}: range {span!r} runs backwards")
        else:
            first = _value(span, where, low, high, names)
            # `5/10` means every 10th from 5 to the end of the field.
            last = high if step_text else first
        found.update(range(first, last + 1, step))
    return frozenset(found)


def _value(text: str, where: str, low: int, high: int, names: tuple[str, ...]) -> int:
    if text.lower() in names:
        # Month names count from 1, day names from 0 (Sunday).
        return names.index(text.lower()) + low if names is MONTHS else names.index(text.lower())
    if not text.isdigit() or not text.isascii():
        expected = f"a number {low}-{high}" + (f" or a name ({', '.join(names)})" if names else "")
        raise CronError(f"{where}: {text!r} is not {expected}")
    number = int(text)
    if not low <= number <= high:
        raise CronError(f"{where}: {number} is out of range ({low}-{high})")
    return number


def _some_day_exists(cron: Cron) -> bool:
    """Whether some month allowed has one of the days allowed (a leap year's Feb 29 counts)."""
    if not cron.days_restricted or cron.weekdays_restricted:
        return True
    longest = {month: calendar.monthrange(2024, month)[1] for month in cron.months}
    return any(day <= longest[month] for month in cron.months for day in cron.days)


def _first_of_next_month(moment: dt.datetime) -> dt.datetime:
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return moment.replace(year=year, month=month, day=1, hour=0, minute=0)


def _utc(moment: dt.datetime) -> dt.datetime:
    if moment.tzinfo is None:
        raise ValueError(f"{moment} has no time zone; slots are computed in UTC")
    return moment.astimezone(dt.UTC)
