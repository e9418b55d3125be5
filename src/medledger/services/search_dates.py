"""Date search over the blind index: every date is a range of days, compared as FHIR ranges.

FHIR R4 (search.html#prefix, #date) compares *ranges*: a resource value has
an implicit range (``2020`` is the whole year, a ``Period`` runs from its
start to its end, an open end runs on), the search value has one too, and
each prefix is a relation between the two. With the resource range
``R = [rs, re]`` and the search range ``P = [ps, pe]``::

    eq  P contains R              ps <= rs and re <= pe
    ne  not eq
    gt  R reaches above P         re > pe
    lt  R reaches below P         rs < ps
    ge  gt, or P contains R   ==  re > pe or rs >= ps   (as rs <= re)
    le  lt, or P contains R   ==  rs < ps or re <= pe
    sa  R starts after P          rs > pe
    eb  R ends before P           re < ps
    ap  R overlaps P widened by a tenth of the time between P and today

Over the blind index only equality of tokens can be tested, so a value is
indexed by the calendar buckets (day, month, year, decade) that hold its
start (``s:``), hold its end (``e:``) and hold all of it (``w:``); a single
day, the common case, by its four buckets once (``p:``). A search
range becomes a handful of buckets (:func:`cover`: whole decades, years,
months, then days), so every prefix above is one set of tokens — any of which
matches — except ``ne`` (a complement) and ``ap`` (two sets, both must
match). Days only: times of day are not indexed and a search value with a
time is refused. Years run from 1800 to 2200; resource values outside are
clamped to those ends (an open end is 2200-12-31).
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import date, timedelta

from medledger.core.errors import InvalidInput

__all__ = [
    "MAX_DAY",
    "MIN_DAY",
    "PREFIXES",
    "DateCondition",
    "cover",
    "date_condition",
    "day_matches",
    "period_days",
    "range_terms",
    "search_days",
    "value_days",
]

MIN_DAY, MAX_DAY = date(1800, 1, 1), date(2200, 12, 31)
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
# A resource value: year, month or day, then anything (a time, a zone) that is ignored.
_VALUE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?(?:T[0-9:.+\-Z]*)?$")
_SEARCH = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")


def _clamp(day: date) -> date:
    return min(max(day, MIN_DAY), MAX_DAY)


def _bucket_days(year: int, month: str | None, day: str | None) -> tuple[date, date]:
    """The days a ``YYYY[-MM[-DD]]`` value denotes; ``ValueError`` if not on the calendar."""
    if day:
        lo = hi = date(year, int(month or 0), int(day))
    elif month:
        m = int(month)
        lo, hi = date(year, m, 1), date(year, m, calendar.monthrange(year, m)[1])
    else:
        lo, hi = date(year, 1, 1), date(year, 12, 31)
    return lo, hi


def value_days(value: object) -> tuple[date, date] | None:
    """The day range of a resource's date, dateTime or instant (``None``: not a date).

    The day is the one written (a time and its zone are not converted).
    """
    if not isinstance(value, str):
        return None
    m = _VALUE.match(value)
    if not m:
        return None
    try:
        lo, hi = _bucket_days(int(m.group(1)), m.group(2), m.group(3))
    except ValueError:
        return None
    return _clamp(lo), _clamp(hi)


def period_days(start: object, end: object) -> tuple[date, date] | None:
    """The day range of a Period: a missing start is the distant past, a missing end ongoing."""
    first, last = value_days(start), value_days(end)
    if first is None and last is None:
        return None
    lo = first[0] if first is not None else MIN_DAY
    hi = last[1] if last is not None else MAX_DAY
    if hi < lo:  # an inverted period (a data error): keep what was written, ordered
        lo, hi = hi, lo
    return lo, hi


def _buckets(day: date) -> list[str]:
    """The decade, year, month and day that hold ``day``."""
    return [f"x:{day.year // 10}", f"y:{day:%Y}", f"m:{day:%Y-%m}", f"d:{day.isoformat()}"]


def range_terms(lo: date, hi: date) -> list[str]:
    """Index terms of the resource range ``[lo, hi]``: the buckets of its start, end and whole.

    A single day (most values: a birth date, a dateTime) is its own start, end
    and whole: its four buckets are indexed once, as ``p:`` (point), and every
    query asks for ``p:`` wherever it asks for ``s:``, ``e:`` or ``w:``.
    """
    if lo == hi:
        return [f"p:{b}" for b in _buckets(lo)]
    terms = [f"s:{b}" for b in _buckets(lo)] + [f"e:{b}" for b in _buckets(hi)]
    terms.extend(f"w:{b}" for b, c in zip(_buckets(lo), _buckets(hi), strict=True) if b == c)
    return terms


def cover(lo: date, hi: date) -> list[str]:
    """Cover ``[lo, hi]`` exactly with whole decades, years, months and single days."""
    terms: list[str] = []
    day = lo
    while day <= hi:
        decade_end = date(day.year // 10 * 10 + 9, 12, 31) if day.year < 9990 else date.max
        year_end = date(day.year, 12, 31)
        month_end = date(day.year, day.month, calendar.monthrange(day.year, day.month)[1])
        if day.month == 1 and day.day == 1 and day.year % 10 == 0 and decade_end <= hi:
            terms.append(f"x:{day.year // 10}")
            last = decade_end
        elif day.month == 1 and day.day == 1 and year_end <= hi:
            terms.append(f"y:{day:%Y}")
            last = year_end
        elif day.day == 1 and month_end <= hi:
            terms.append(f"m:{day:%Y-%m}")
            last = month_end
        else:
            terms.append(f"d:{day.isoformat()}")
            last = day
        if last >= hi:  # also ends the walk at date.max, which has no next day
            break
        day = last + timedelta(days=1)
    return terms


def search_days(value: str) -> tuple[str, date, date]:
    """The prefix and the day range of a date search value like ``ge2020-03``."""
    prefix = value[:2] if value[:2] in PREFIXES else "eq"
    text = value[2:] if value[:2] in PREFIXES else value
    m = _SEARCH.fullmatch(text)
    if not m:
        raise InvalidInput(
            f"date search value {value!r} must be YYYY, YYYY-MM or YYYY-MM-DD, "
            f"optionally after a prefix ({', '.join(PREFIXES)})"
        )
    year = int(m.group(1))
    if not MIN_DAY.year <= year <= MAX_DAY.year:
        # Open ranges run from 1800 to 2200; outside them a day before or after
        # can fall off the calendar (``gt9999-12-31``), so such values are refused.
        raise InvalidInput(
            f"date search value {value!r}: years from {MIN_DAY.year} to {MAX_DAY.year} only"
        )
    try:
        lo, hi = _bucket_days(year, m.group(2), m.group(3))
    except ValueError:
        raise InvalidInput(f"date search value {value!r} is not a real date") from None
    return prefix, lo, hi


@dataclass(frozen=True, slots=True, kw_only=True)
class DateCondition:
    """A date comparison as index terms: every set in ``all_of`` must share a term with the
    resource (one set for most prefixes, two for ``ap``); ``negated`` inverts the whole."""

    all_of: tuple[tuple[str, ...], ...]
    negated: bool = False


def _after(day: date) -> list[str]:
    return cover(day + timedelta(days=1), MAX_DAY) if day < MAX_DAY else []


def _before(day: date) -> list[str]:
    return cover(MIN_DAY, day - timedelta(days=1)) if day > MIN_DAY else []


def date_condition(value: str, *, today: date) -> DateCondition:
    """The index terms that decide a date search value (see the module docstring's table).

    ``today`` sets the tolerance of ``ap``: a tenth of the days between the value and today.
    """
    condition = _range_condition(value, today)
    # A point value is indexed as ``p:`` only: it matches wherever s:, e: or w: would.
    return DateCondition(
        all_of=tuple((*terms, *(f"p:{t[2:]}" for t in terms)) for terms in condition.all_of),
        negated=condition.negated,
    )


def _range_condition(value: str, today: date) -> DateCondition:
    prefix, ps, pe = search_days(value)
    bucket = cover(ps, pe)  # a search value is one day, month or year: one bucket
    if prefix in ("eq", "ne"):
        return DateCondition(all_of=(tuple(f"w:{b}" for b in bucket),), negated=prefix == "ne")
    if prefix == "gt":
        terms = [f"e:{b}" for b in _after(pe)]
    elif prefix == "lt":
        terms = [f"s:{b}" for b in _before(ps)]
    elif prefix == "ge":
        terms = [f"e:{b}" for b in _after(pe)] + [f"s:{b}" for b in cover(ps, MAX_DAY)]
    elif prefix == "le":
        terms = [f"s:{b}" for b in _before(ps)] + [f"e:{b}" for b in cover(MIN_DAY, pe)]
    elif prefix == "sa":
        terms = [f"s:{b}" for b in _after(pe)]
    elif prefix == "eb":
        terms = [f"e:{b}" for b in _before(ps)]
    else:  # ap: overlap with the widened range, rs <= pe' and re >= ps'
        slack = timedelta(days=abs((today - ps).days) // 10)
        lo = ps - slack if ps - MIN_DAY > slack else MIN_DAY
        hi = pe + slack if MAX_DAY - pe > slack else MAX_DAY
        return DateCondition(
            all_of=(
                tuple(f"s:{b}" for b in cover(MIN_DAY, hi)),
                tuple(f"e:{b}" for b in cover(lo, MAX_DAY)),
            )
        )
    return DateCondition(all_of=(tuple(terms),))


def day_matches(value: str, day: date, *, today: date) -> bool:
    """Whether a single day (an instant's day) satisfies a date search value.

    The same table as :func:`date_condition`, for a value kept in plaintext
    (a version's ``lastUpdated``) rather than in the blind index.
    """
    prefix, ps, pe = search_days(value)
    if prefix in ("eq", "ne"):
        return (ps <= day <= pe) == (prefix == "eq")
    if prefix in ("gt", "sa"):
        return day > pe
    if prefix in ("lt", "eb"):
        return day < ps
    if prefix == "ge":
        return day >= ps
    if prefix == "le":
        return day <= pe
    slack = timedelta(days=abs((today - ps).days) // 10)
    return ps - slack <= day <= pe + slack
