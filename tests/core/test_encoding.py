"""Tests for :mod:`medledger.core.encoding` (canonical JSON, DESIGN.md "Fixed formats").

The fixed format is ``json.dumps(obj, sort_keys=True, separators=(",", ":"),
ensure_ascii=False).encode()`` over str/int/bool/null/list/dict. Known vectors
below are literal bytes written by hand from that definition.
"""

from __future__ import annotations

import contextlib
import json
import types
from collections import OrderedDict
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from medledger.core.encoding import (
    MAX_DEPTH,
    MAX_SAFE_INTEGER,
    canonical_bytes,
    parse_canonical,
)
from medledger.core.errors import InvalidInput

# ---------------------------------------------------------------------------
# Known vectors.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"b": 1, "a": [True, None, "\u00e9"]}, '{"a":[true,null,"\u00e9"],"b":1}'.encode()),
        (None, b"null"),
        (True, b"true"),
        (False, b"false"),
        (0, b"0"),
        (-1, b"-1"),
        (MAX_SAFE_INTEGER, b"9007199254740991"),
        (-MAX_SAFE_INTEGER, b"-9007199254740991"),
        ("", b'""'),
        ([], b"[]"),
        ({}, b"{}"),
        ([[], {}, [[]]], b"[[],{},[[]]]"),
        ({"z": {"y": 1, "x": [2, 1]}, "a": []}, b'{"a":[],"z":{"x":[2,1],"y":1}}'),
        # Booleans stay booleans even though True == 1 in Python.
        ({"t": True, "one": 1}, b'{"one":1,"t":true}'),
        # Keys sort by code point: "" < "B" < "a" < "aa" < "b" < "\u00e9".
        (
            {"b": 0, "\u00e9": 0, "aa": 0, "a": 0, "B": 0, "": 0},
            '{"":0,"B":0,"a":0,"aa":0,"b":0,"\u00e9":0}'.encode(),
        ),
        # Code point order puts U+FB01 before U+1F600. (RFC 8785 would sort by
        # UTF-16 code units and put U+1F600, i.e. D83D DE00, first.)
        ({"\U0001f600": 1, "\ufb01": 2}, '{"\ufb01":2,"\U0001f600":1}'.encode()),
        # Non-ASCII stays raw UTF-8, including U+2028 and astral characters.
        ("\u00e9\u2028\U0001f600", b'"\xc3\xa9\xe2\x80\xa8\xf0\x9f\x98\x80"'),
        # Escapes: the two mandatory, the five short forms, other C0 controls
        # as lowercase \u00xx; DEL and "/" are not escaped.
        ('"\\', b'"\\"\\\\"'),
        ("\b\f\n\r\t", b'"\\b\\f\\n\\r\\t"'),
        ("\x00\x1f\x7f/", b'"\\u0000\\u001f\x7f/"'),
        # Tuples encode as lists (documented).
        ((1, "a", (None,)), b'[1,"a",[null]]'),
    ],
)
def test_known_vectors(value: Any, expected: bytes) -> None:
    assert canonical_bytes(value) == expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ('{"a":[true,null,"\u00e9"],"b":1}'.encode(), {"a": [True, None, "\u00e9"], "b": 1}),
        (b"null", None),
        (b"true", True),
        (b"0", 0),
        (b"-9007199254740991", -MAX_SAFE_INTEGER),
        (b'"\\u0000"', "\x00"),
        (b'"\\"\\\\"', '"\\'),
        (b"[[],{}]", [[], {}]),
        (b'{"":{"":[]}}', {"": {"": []}}),
    ],
)
def test_parse_known_vectors(data: bytes, expected: Any) -> None:
    value = parse_canonical(data)
    assert _same(value, expected)


def test_dict_subclasses_encode_like_dicts() -> None:
    ordered = OrderedDict([("b", 1), ("a", 2)])
    assert canonical_bytes(ordered) == b'{"a":2,"b":1}'


@pytest.mark.xfail(
    strict=True,
    reason="BUG: _check accepts any collections.abc.Mapping, but json.dumps only "
    "serialises dict, so a non-dict Mapping raises TypeError instead of InvalidInput",
)
def test_non_dict_mapping_is_encoded_or_rejected_cleanly() -> None:
    proxy = types.MappingProxyType({"b": 1, "a": 2})
    with contextlib.suppress(InvalidInput):
        assert canonical_bytes(proxy) == b'{"a":2,"b":1}'


# ---------------------------------------------------------------------------
# Rejections: Python values.
# ---------------------------------------------------------------------------


class _Custom:
    pass


@pytest.mark.parametrize(
    "value",
    [
        1.5,
        0.0,
        -0.0,
        1e300,
        float("nan"),
        float("inf"),
        float("-inf"),
        {"a": 1.0},
        [1, [2, [3.0]]],
        {1: "a"},
        {None: 1},
        {True: 1},
        {("a",): 1},
        {b"a": 1},
        "\ud800",
        "a\udfffb",
        ["ok", "\udc00"],
        {"\ud800": 1},
        MAX_SAFE_INTEGER + 1,
        -MAX_SAFE_INTEGER - 1,
        2**64,
        10**400,
        b"bytes",
        bytearray(b"x"),
        {1, 2},
        frozenset(),
        Decimal("1"),
        1 + 2j,
        _Custom(),
        {"a": _Custom()},
    ],
    ids=repr,
)
def test_rejects_values_outside_the_subset(value: Any) -> None:
    with pytest.raises(InvalidInput):
        canonical_bytes(value)


def test_error_names_the_json_path() -> None:
    with pytest.raises(InvalidInput, match=r"\$\.a\[1\]"):
        canonical_bytes({"a": [1, 1.5]})
    with pytest.raises(InvalidInput, match=r"\$\.x\.y"):
        canonical_bytes({"x": {"y": 2**60}})


def _nested_list(depth: int, inner: Any) -> Any:
    value = inner
    for _ in range(depth):
        value = [value]
    return value


def _nested_dict(depth: int, inner: Any) -> Any:
    value = inner
    for _ in range(depth):
        value = {"k": value}
    return value


@pytest.mark.parametrize("nest", [_nested_list, _nested_dict])
def test_max_depth_boundary(nest: Any) -> None:
    ok = nest(MAX_DEPTH, 1)
    data = canonical_bytes(ok)
    assert _same(parse_canonical(data), ok)
    assert _same(parse_canonical(canonical_bytes(nest(MAX_DEPTH, []))), nest(MAX_DEPTH, []))
    with pytest.raises(InvalidInput):
        canonical_bytes(nest(MAX_DEPTH + 1, 1))
    with pytest.raises(InvalidInput):
        canonical_bytes(nest(MAX_DEPTH + 1, []))
    # The same text is refused by the parser.
    too_deep = json.dumps(nest(MAX_DEPTH + 1, 1), separators=(",", ":")).encode()
    with pytest.raises(InvalidInput):
        parse_canonical(too_deep)


@pytest.mark.parametrize("nest", [_nested_list, _nested_dict])
def test_very_deep_values_raise_invalid_input_not_recursion_error(nest: Any) -> None:
    with pytest.raises(InvalidInput):
        canonical_bytes(nest(100_000, None))


def test_self_referencing_value_is_rejected() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(InvalidInput):
        canonical_bytes(loop)
    cycle: dict[str, Any] = {}
    cycle["self"] = cycle
    with pytest.raises(InvalidInput):
        canonical_bytes(cycle)


# ---------------------------------------------------------------------------
# Rejections: bytes.
# ---------------------------------------------------------------------------

_DEEP = 100_000


@pytest.mark.parametrize(
    "data",
    [
        # Deep nesting: must be InvalidInput, never RecursionError.
        b"[" * _DEEP + b"]" * _DEEP,
        b"[" * _DEEP,
        b'{"a":' * _DEEP + b"1" + b"}" * _DEEP,
        b"[" * 500 + b"]" * 500,
        # Floats, NaN and infinities, as JSON text.
        b'{"a":NaN}',
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b"[Infinity]",
        b"1.5",
        b"1.0",
        b"-0.0",
        b"1e2",
        b"1E2",
        b'{"a":1.5}',
        b"1e400",
        # Unsafe integers.
        b"9007199254740992",
        b"-9007199254740992",
        b"123456789012345678901234567890",
        # Invalid UTF-8.
        b'"\xff"',
        b'"\xc3"',
        b'"\xc0\xaf"',
        b'"\xed\xa0\x80"',
        b'{"\xfe":1}',
        b"\xef\xbb\xbf{}",
        # Duplicate keys (also when the values agree).
        b'{"a":1,"a":2}',
        b'{"a":1,"a":1}',
        b'{"x":{"b":1,"b":2}}',
        # Valid JSON that is not canonical.
        b" 1",
        b"1 ",
        b"1\n",
        b"\t[]",
        b'{"a": 1}',
        b'{"a" :1}',
        b"[1, 2]",
        b"[ ]",
        b'{"b":1,"a":2}',
        b'{"a":{"d":1,"c":2}}',
        b'"\\u00e9"',
        b'"\\u00E9"',
        b'"\\u0041"',
        b'"\\/"',
        b'"\\u001F"',
        b'"\\u000a"',
        b'"\\ud83d\\ude00"',
        b"-0",
        # Lone surrogate escapes.
        b'"\\ud800"',
        b'{"\\udc00":1}',
        # Not JSON at all.
        b"",
        b"{",
        b"[1,]",
        b"{'a':1}",
        b"01",
        b"+1",
        b"tru",
        b'"abc',
        b"[1]x",
        b'"\x01"',
        b"undefined",
    ],
    ids=lambda b: repr(b[:24]),
)
def test_parse_rejects(data: bytes) -> None:
    with pytest.raises(InvalidInput):
        parse_canonical(data)


@pytest.mark.xfail(
    strict=True,
    reason="BUG: json.loads raises ValueError (int max_str_digits, 4300) for long integer "
    "literals; parse_canonical lets it escape instead of raising InvalidInput",
)
@pytest.mark.parametrize("digits", [4301, 10_000])
def test_parse_rejects_huge_integer_literal(digits: int) -> None:
    with pytest.raises(InvalidInput):
        parse_canonical(b"1" * digits)


# ---------------------------------------------------------------------------
# Properties.
# ---------------------------------------------------------------------------

_SAFE_INTS = st.integers(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER)
_SCALARS = st.none() | st.booleans() | _SAFE_INTS | st.text()
_JSON = st.recursive(
    _SCALARS,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)


def _same(a: Any, b: Any) -> bool:
    """Equality that also distinguishes bool from int (True == 1 in Python)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


@settings(max_examples=150, deadline=None)
@given(_JSON)
def test_prop_round_trip(value: Any) -> None:
    assume(_depth(value) <= MAX_DEPTH)
    data = canonical_bytes(value)
    # The fixed format of DESIGN.md, literally.
    assert data == json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
    parsed = parse_canonical(data)
    assert _same(parsed, value)
    assert canonical_bytes(parsed) == data


_FLAT = _SCALARS | st.lists(_SCALARS, max_size=3)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=8), _FLAT, min_size=2, max_size=8), st.randoms())
def test_prop_key_insertion_order_does_not_matter(value: dict[str, Any], rnd: Any) -> None:
    items = list(value.items())
    rnd.shuffle(items)
    shuffled = dict(items)
    reversed_ = dict(reversed(items))
    assert canonical_bytes(shuffled) == canonical_bytes(value)
    assert canonical_bytes(reversed_) == canonical_bytes(value)
    assert canonical_bytes({"outer": [shuffled]}) == canonical_bytes({"outer": [value]})


@settings(max_examples=50, deadline=None)
@given(_FLAT, st.sampled_from([b" ", b"\n", b"\t", b"\r"]), st.booleans())
def test_prop_surrounding_whitespace_is_not_canonical(value: Any, ws: bytes, front: bool) -> None:
    data = canonical_bytes(value)
    with pytest.raises(InvalidInput):
        parse_canonical(ws + data if front else data + ws)


@settings(max_examples=100, deadline=None)
@given(
    st.recursive(
        st.floats() | _SCALARS,
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=4), children, max_size=4)
        ),
        max_leaves=15,
    )
)
def test_prop_any_float_anywhere_is_rejected(value: Any) -> None:
    assume(_depth(value) <= MAX_DEPTH)

    def has_float(v: Any) -> bool:
        if isinstance(v, float):
            return True
        if isinstance(v, list):
            return any(has_float(x) for x in v)
        if isinstance(v, dict):
            return any(has_float(x) for x in v.values())
        return False

    if has_float(value):
        with pytest.raises(InvalidInput):
            canonical_bytes(value)
    else:
        assert _same(parse_canonical(canonical_bytes(value)), value)


@settings(max_examples=100, deadline=None)
@given(st.integers(MAX_SAFE_INTEGER + 1, 2**200) | st.integers(-(2**200), -MAX_SAFE_INTEGER - 1))
def test_prop_unsafe_integers_are_rejected(n: int) -> None:
    with pytest.raises(InvalidInput):
        canonical_bytes(n)
    with pytest.raises(InvalidInput):
        canonical_bytes({"n": [n]})
    with pytest.raises(InvalidInput):
        parse_canonical(str(n).encode())


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=64),
        st.text(alphabet='{}[]",:0123456789-.eEtrufalsn \\u', max_size=40).map(str.encode),
    )
)
def test_prop_parse_returns_canonical_value_or_raises_invalid_input(data: bytes) -> None:
    try:
        value = parse_canonical(data)
    except InvalidInput:
        return  # any other exception fails the test
    assert canonical_bytes(value) == data
