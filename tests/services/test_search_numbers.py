"""Number and quantity search: decimal cells over the blind index against the specification's table."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medledger.core.errors import InvalidInput
from medledger.services.search import Match, query_tokens
from medledger.services.search_numbers import (
    DIGITS,
    E_MAX,
    number_condition,
    point_cells,
    search_range,
)

KEY = b"k" * 32
TODAY = date(2026, 12, 5)
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")


def spec_holds(prefix: str, value: Decimal, search: str) -> bool:
    """FHIR R4 search.html#number read literally: the search value's precision is the
    number of digits written; ``ap`` is within 10 %."""
    x = Decimal(search)
    digits_after_point = -x.as_tuple().exponent  # type: ignore[operator]
    half = Decimal(1).scaleb(-digits_after_point) / 2
    lo, hi = x - half, x + half
    in_range = lo <= value < hi
    return {
        "eq": in_range,
        "ne": not in_range,
        "gt": value > x,
        "lt": value < x,
        "ge": value >= x,
        "le": value <= x,
        "sa": value >= hi,
        "eb": value < lo,
        "ap": abs(value - x) <= max(abs(x) / 10, half),
    }[prefix]


def matches(value: Decimal, search: str) -> bool:
    condition = number_condition(search)
    found = bool(set(point_cells(value)) & set(condition.cells))
    return found != condition.negated


decimals = st.builds(
    lambda sign, digits, exponent: Decimal(f"{sign}{digits}E{exponent}"),
    st.sampled_from(["", "-"]),
    st.integers(min_value=0, max_value=10**DIGITS - 1),
    st.integers(min_value=-12, max_value=6),
)
search_texts = st.builds(
    lambda sign, digits, places: f"{sign}{Decimal(digits).scaleb(-places):f}",
    st.sampled_from(["", "-"]),
    st.integers(min_value=1, max_value=99999),
    st.integers(min_value=0, max_value=6),
)


@settings(max_examples=400, deadline=None)
@given(value=decimals, search=search_texts, prefix=st.sampled_from(PREFIXES))
def test_cells_decide_every_prefix_as_the_specification_says(
    value: Decimal, search: str, prefix: str
) -> None:
    assert matches(value, prefix + search) == spec_holds(prefix, value, search)


@settings(max_examples=200, deadline=None)
@given(search=search_texts, prefix=st.sampled_from(PREFIXES), step=st.sampled_from([-1, 0, 1]))
def test_values_at_the_edges_of_a_range(search: str, prefix: str, step: int) -> None:
    """Values at and just beside the search value and its range's ends."""
    x = Decimal(search)
    half = Decimal(1).scaleb(x.as_tuple().exponent) / 2  # type: ignore[arg-type]
    tiny = Decimal(1).scaleb(x.as_tuple().exponent - 3)  # type: ignore[operator]
    for edge in (x, x - half, x + half, x - abs(x) / 10, x + abs(x) / 10):
        value = edge + step * tiny
        if value.is_zero() or len(value.normalize().as_tuple().digits) <= DIGITS:
            assert matches(value, prefix + search) == spec_holds(prefix, value, search), value


def test_worked_examples_of_the_specification() -> None:
    assert matches(Decimal("99.5"), "100") and matches(Decimal("100.4999"), "100")
    assert not matches(Decimal("100.5"), "100") and not matches(Decimal("99.49"), "100")
    assert matches(Decimal("100.004"), "100.00") and not matches(Decimal("100.005"), "100.00")
    assert matches(Decimal("100.3"), "ne100.00") and not matches(Decimal("100"), "ne100")
    assert matches(Decimal("100.0001"), "gt100") and not matches(Decimal("100"), "gt100")
    assert matches(Decimal("100"), "ge100") and matches(Decimal("100"), "le100")
    assert matches(Decimal("91"), "ap100") and not matches(Decimal("89"), "ap100")
    assert matches(Decimal("0"), "lt1") and matches(Decimal("-5"), "lt-4.9")
    assert matches(Decimal("0"), "0") and not matches(Decimal("0.6"), "0")


def test_a_value_is_indexed_by_a_few_cells() -> None:
    assert len(point_cells(Decimal("70.0"))) == 3
    assert len(point_cells(Decimal("72.4"))) == 5
    assert point_cells(Decimal("70")) == point_cells(Decimal("70.000"))
    assert len(point_cells(Decimal("1.234567890123"))) <= DIGITS + 2


def test_an_open_range_costs_a_bounded_number_of_cells() -> None:
    worst = max(
        len(number_condition(p + v).cells)
        for p in PREFIXES
        for v in ("1", "123.456789", "-0.000123", "99999999")
    )
    assert worst <= 2 * 9 * DIGITS + 2 * (E_MAX + 11) + 1


@pytest.mark.parametrize(
    "value",
    ["five", "gt", "1e99", "1e-30", "nan", "inf", " 5", "gtgt5", "ap--1", "", "1." + "0" * 30],
)
def test_bad_search_values_are_refused(value: str) -> None:
    with pytest.raises(InvalidInput):
        search_range(value)


def test_quantity_values_carry_their_unit() -> None:
    def plan(value: str) -> object:
        return query_tokens(KEY, "Observation", {"value-quantity": [value]}, today=TODAY)

    assert plan("gt5|http://unitsofmeasure.org|mg") != plan("gt5||mg") != plan("gt5")
    assert isinstance(plan("gt5").parts[0], Match)  # type: ignore[attr-defined]
    for bad in ("5|mg", "5|a|b|c", "5|http://unitsofmeasure.org|"):
        with pytest.raises(InvalidInput):
            plan(bad)
