"""Number and quantity search over the blind index: decimal cells, compared with every prefix.

FHIR R4 (search.html#number, #quantity, #prefix): a search value has an
implicit precision — ``100`` is ``[99.5, 100.5)``, ``100.00`` is
``[99.995, 100.005)`` — that ``eq``, ``ne``, ``sa``, ``eb`` use; ``gt``,
``lt``, ``ge``, ``le`` compare with the value itself and ``ap`` with the
value ±10 %. A resource's value is a point (the decimal as written)::

    eq  lo <= v < hi            ne  not eq (a resource with the parameter)
    gt  v > x                   lt  v < x
    ge  v >= x                  le  v <= x
    sa  v >= hi                 eb  v < lo
    ap  x - |x|/10 <= v <= x + |x|/10   (at least [lo, hi) for x = 0)

where ``x`` is the search value and ``[lo, hi)`` its implicit range.

Tokens have no order, so a value is indexed by the *cells* holding it. A
value is rounded to :data:`DIGITS` significant digits, ``m * 10^(E+1-DIGITS)``
with ``m`` a ``DIGITS``-digit integer; its cells are its sign and decimal
magnitude ``E`` (``+2``: 100 to 999.9...), and each leading-digit prefix of
``m`` up to its last non-zero digit (``+2.7``, ``+2.72``: 720 to 729.9...),
and its end (``+2=72``: exactly 720). A search range becomes the cells that
cover it exactly — whole magnitudes, then the fewest digit prefixes at its
edges (at most 9 per digit per edge) — and a cell deeper than a value's last
digit is also asked as that cell's lower end (``+2=72`` for ``+2.7200``). So
every prefix is one set of tokens, any of which matches (``ne`` a
complement). Magnitudes run from 10^:data:`E_MIN` to 10^(:data:`E_MAX`+1);
resource values beyond are clamped to those ends, search values beyond are
refused. Zero is its own cell.

Quantities add the unit: each cell is indexed once without a unit, once
per ``||code`` (the code and the unit text) and once as ``|system|code``, so
``5.4|http://unitsofmeasure.org|mg`` asks for the same cells in that unit.
Units are not converted (``g`` does not find ``mg``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal, InvalidOperation

from medledger.core.errors import InvalidInput

__all__ = [
    "DIGITS",
    "EVERY_NUMBER",
    "E_MAX",
    "E_MIN",
    "NumberCondition",
    "NumberRange",
    "number_condition",
    "parse_number",
    "point_cells",
    "quantity_units",
    "range_cells",
    "search_range",
]

#: Values are compared on this many significant digits (a double holds 15-17).
DIGITS = 10
#: Magnitudes from 10^E_MIN to just below 10^(E_MAX + 1).
E_MIN, E_MAX = -10, 14
_LOW: int = 10 ** (DIGITS - 1)
_HIGH: int = 10**DIGITS - 1
#: A search value has at most this many digits (its range's ends are then exact in
#: ``decimal``'s default 28-digit arithmetic).
MAX_SEARCH_DIGITS = 20
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")


def parse_number(value: object) -> Decimal | None:
    """A resource's number as a finite :class:`Decimal` (``None``: not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _grid(number: Decimal) -> tuple[str, int, int] | None:
    """``(sign, E, m)``: the value rounded to :data:`DIGITS` digits and clamped; ``None``: 0."""
    if number.is_zero():
        return None
    sign = "+" if number > 0 else "-"
    magnitude = abs(number)
    exponent = magnitude.adjusted()
    m = int(magnitude.scaleb(DIGITS - 1 - exponent).to_integral_value(ROUND_HALF_EVEN))
    if m > _HIGH:  # 9.9999999996 rounds up into the next magnitude
        m, exponent = _LOW, exponent + 1
    if exponent < E_MIN:
        m, exponent = _LOW, E_MIN
    elif exponent > E_MAX:
        m, exponent = _HIGH, E_MAX
    return sign, exponent, m


def point_cells(number: Decimal) -> list[str]:
    """The cells a resource value is indexed by (3 for ``70``, 5 for ``72.4``)."""
    grid = _grid(number)
    if grid is None:
        return ["0"]
    sign, exponent, m = grid
    digits = str(m).rstrip("0")
    bucket = f"{sign}{exponent}"
    prefixes = [f"{bucket}.{digits[:d]}" for d in range(1, len(digits) + 1)]
    return [bucket, *prefixes, f"{bucket}={digits}"]


@dataclass(frozen=True, slots=True)
class NumberRange:
    """A range of values; ``None`` for an open end."""

    lo: Decimal | None
    lo_inclusive: bool
    hi: Decimal | None
    hi_inclusive: bool

    def holds(self, value: Decimal) -> bool:
        if self.lo is not None and (
            value < self.lo or (value == self.lo and not self.lo_inclusive)
        ):
            return False
        return not (
            self.hi is not None
            and (value > self.hi or (value == self.hi and not self.hi_inclusive))
        )


#: Every value: its cover is each magnitude of both signs, and zero.
EVERY_NUMBER = NumberRange(None, False, None, False)


def _divide(value: Decimal, unit: Decimal, rounding: str) -> int:
    return int((value / unit).to_integral_value(rounding))


def _first(bound: Decimal | None, inclusive: bool, unit: Decimal) -> int:
    """The least integer ``m`` with ``m·unit`` at or above (past, if exclusive) ``bound``."""
    if bound is None:
        return _LOW
    if inclusive:
        return _divide(bound, unit, ROUND_CEILING)
    return _divide(bound, unit, ROUND_FLOOR) + 1


def _last(bound: Decimal | None, inclusive: bool, unit: Decimal) -> int:
    """The greatest integer ``m`` with ``m·unit`` at or below (before, if exclusive) ``bound``."""
    if bound is None:
        return _HIGH
    if inclusive:
        return _divide(bound, unit, ROUND_FLOOR)
    return _divide(bound, unit, ROUND_CEILING) - 1


def _digit_cover(bucket: str, first: int, last: int) -> Iterator[str]:
    """Cells covering the ``DIGITS``-digit integers ``[first, last]`` of one magnitude."""
    if first <= _LOW and last >= _HIGH:
        yield bucket
        return
    m = max(first, _LOW)
    last = min(last, _HIGH)
    while m <= last:
        width = 0  # the largest 10^width block aligned at m and inside [m, last]
        while (
            width < DIGITS - 1 and m % 10 ** (width + 1) == 0 and m + 10 ** (width + 1) - 1 <= last
        ):
            width += 1
        prefix = str(m // 10**width)
        yield f"{bucket}.{prefix}"
        stripped = prefix.rstrip("0")
        if len(stripped) < len(prefix):  # a value ending sooner lies at this cell's lower end
            yield f"{bucket}={stripped}"
        m += 10**width


def range_cells(span: NumberRange) -> list[str]:
    """The cells covering exactly the (rounded, clamped) values ``span`` holds."""
    cells: list[str] = []
    for exponent in range(E_MIN, E_MAX + 1):
        unit = Decimal(1).scaleb(exponent + 1 - DIGITS)
        # Positive values m·unit; negative values -m·unit (the bounds mirror).
        first = _first(span.lo, span.lo_inclusive, unit)
        last = _last(span.hi, span.hi_inclusive, unit)
        if first <= last and first <= _HIGH and last >= _LOW:
            cells.extend(_digit_cover(f"+{exponent}", first, last))
        lo = None if span.hi is None else -span.hi
        hi = None if span.lo is None else -span.lo
        first = _first(lo, span.hi_inclusive, unit)
        last = _last(hi, span.lo_inclusive, unit)
        if first <= last and first <= _HIGH and last >= _LOW:
            cells.extend(_digit_cover(f"-{exponent}", first, last))
    if span.holds(Decimal(0)):
        cells.append("0")
    return cells


def search_range(value: str) -> tuple[str, Decimal, Decimal, Decimal]:
    """The prefix, the number, and its implicit range ``[lo, hi)`` of a search value."""
    prefix = value[:2] if value[:2] in PREFIXES else "eq"
    text = value[2:] if value[:2] in PREFIXES else value
    try:
        number = Decimal(text)
    except InvalidOperation:
        number = Decimal("NaN")
    if not number.is_finite() or text.strip() != text or not text:
        raise InvalidInput(
            f"number search value {value!r} must be a decimal, optionally after a prefix "
            f"({', '.join(PREFIXES)})"
        )
    if len(number.as_tuple().digits) > MAX_SEARCH_DIGITS:
        raise InvalidInput(f"number search value {value!r}: at most {MAX_SEARCH_DIGITS} digits")
    if not number.is_zero() and not E_MIN <= abs(number).adjusted() <= E_MAX:
        raise InvalidInput(
            f"number search value {value!r}: magnitudes from 1e{E_MIN} to 1e{E_MAX + 1} only"
        )
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int)  # finite
    half = Decimal(5).scaleb(exponent - 1)
    return prefix, number, number - half, number + half


@dataclass(frozen=True, slots=True, kw_only=True)
class NumberCondition:
    """A number comparison: the cells that match, or (``negated``) those that must not."""

    cells: tuple[str, ...]
    span: NumberRange
    negated: bool = False


def number_condition(value: str) -> NumberCondition:
    """The cells deciding a number search value (see the module docstring's table)."""
    prefix, x, lo, hi = search_range(value)
    if prefix in ("eq", "ne"):
        span = NumberRange(lo, True, hi, False)
    elif prefix == "gt":
        span = NumberRange(x, False, None, False)
    elif prefix == "lt":
        span = NumberRange(None, False, x, False)
    elif prefix == "ge":
        span = NumberRange(x, True, None, False)
    elif prefix == "le":
        span = NumberRange(None, False, x, True)
    elif prefix == "sa":
        span = NumberRange(hi, True, None, False)
    elif prefix == "eb":
        span = NumberRange(None, False, lo, False)
    else:  # ap: within a tenth of the value, and at least its own precision
        slack = max(abs(x) / 10, hi - x)
        span = NumberRange(x - slack, True, x + slack, True)
    return NumberCondition(cells=tuple(range_cells(span)), span=span, negated=prefix == "ne")


def quantity_units(quantity: dict[str, object]) -> list[str]:
    """The unit forms a Quantity is indexed under: ``""``, ``||code``, ``||unit``,
    ``|system|code``."""
    forms = [""]
    code, unit, system = quantity.get("code"), quantity.get("unit"), quantity.get("system")
    for text in (code, unit):
        if isinstance(text, str) and text and f"||{text}" not in forms:
            forms.append(f"||{text}")
    if isinstance(system, str) and isinstance(code, str) and code:
        forms.append(f"|{system}|{code}")
    return forms
