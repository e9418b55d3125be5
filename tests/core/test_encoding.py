"""Tests for :mod:`medledger.core.encoding` (canonical JSON, DESIGN.md "Fixed formats").

The fixed format is ``json.dumps(obj, sort_keys=True, separators=(",", ":"),
ensure_ascii=False).encode()`` over str/int/bool/null/list/dict. Known vectors
below are literal bytes written by hand from that definition.
"""

from __future__ import annotations

import copy
import json
import re
import types
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from medledger.core.encoding import (
    MAX_DEPTH,
    MAX_SAFE_INTEGER,
    canonical_bytes,
    canonical_text,
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
        # Keys are limited to the BMP, where code point order is RFC 8785's
        # UTF-16 order; U+FFFF is the largest key character allowed.
        (
            {"\uffff": 0, "\ufb01": 1, "\ue000": 2, "\ud7ff": 3},
            '{"\ud7ff":3,"\ue000":2,"\ufb01":1,"\uffff":0}'.encode(),
        ),
        # Values (not keys) may hold characters beyond U+FFFF.
        ({"\ufb01": "\U0001f600"}, b'{"\xef\xac\x81":"\xf0\x9f\x98\x80"}'),
        (["\U00010000", {"k": ["\U0010ffff"]}], '["\U00010000",{"k":["\U0010ffff"]}]'.encode()),
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
        ('{"\ufb01":"\U0001f600"}'.encode(), {"\ufb01": "\U0001f600"}),
        ('{"\uffff":0}'.encode(), {"\uffff": 0}),
    ],
)
def test_parse_known_vectors(data: bytes, expected: Any) -> None:
    value = parse_canonical(data)
    assert _same(value, expected)


def test_dict_subclasses_encode_like_dicts() -> None:
    ordered = OrderedDict([("b", 1), ("a", 2)])
    assert canonical_bytes(ordered) == b'{"a":2,"b":1}'


class _PlainMapping(Mapping[str, Any]):
    """A ``Mapping`` that is not a ``dict``."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


@pytest.mark.parametrize(
    "make", [types.MappingProxyType, _PlainMapping], ids=["MappingProxyType", "Mapping"]
)
def test_non_dict_mappings_are_rejected(make: Any) -> None:
    mapping = make({"b": 1, "a": 2})
    assert isinstance(mapping, Mapping)
    assert not isinstance(mapping, dict)
    with pytest.raises(InvalidInput, match="unsupported type"):
        canonical_bytes(mapping)
    with pytest.raises(InvalidInput, match=r"unsupported type .* at \$\.x\[1\]"):
        canonical_bytes({"x": [0, mapping]})
    with pytest.raises(InvalidInput, match="unsupported type"):
        canonical_bytes(make({}))


# ---------------------------------------------------------------------------
# Rejections: Python values.
# ---------------------------------------------------------------------------


class _Custom:
    # A fixed repr: the test ids below are reprs, and an id with a memory address
    # differs between pytest-xdist workers, which then refuse to run the suite.
    def __repr__(self) -> str:
        return "_Custom()"


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
        # Object keys with a character beyond U+FFFF.
        {"\U0001f600": 1, "\ufb01": 2},
        {"\U00010000": 1},
        {"a\U0010ffffb": 1},
        {"ok": 1, "k": {"\U0001f600": None}},
        [0, [{"\U0001d11e": "x"}]],
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


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"\U0001f600": 1}, "$"),
        ({"a": {"b\U0001f600": 1}}, "$.a"),
        ({"a": [0, {"\U00010000": 1}]}, "$.a[1]"),
    ],
)
def test_non_bmp_key_is_rejected_naming_the_path(value: Any, path: str) -> None:
    with pytest.raises(InvalidInput, match=f"Basic Multilingual Plane at {re.escape(path)}$"):
        canonical_bytes(value)
    # The same text, as bytes, is refused by the parser.
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    with pytest.raises(InvalidInput):
        parse_canonical(text.encode())


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


def _containers(count: int, kind: str, scalar: bool) -> Any:
    """Exactly ``count`` >= 1 nested containers; the innermost holds one scalar or nothing.

    ``kind`` is "list", "dict" or "mixed" (alternating, a list outermost).
    """

    def is_list(level: int) -> bool:  # level 0 is the top
        return kind == "list" or (kind == "mixed" and level % 2 == 0)

    inner: Any = [1] if scalar else []
    if not is_list(count - 1):
        inner = {"k": 1} if scalar else {}
    value = inner
    for level in range(count - 2, -1, -1):
        value = [value] if is_list(level) else {"k": value}
    return value


def test_containers_helper_counts_exactly() -> None:
    assert _containers(1, "list", False) == []
    assert _containers(1, "dict", True) == {"k": 1}
    assert _containers(3, "list", True) == [[[1]]]
    assert _containers(2, "dict", False) == {"k": {}}
    assert _containers(3, "mixed", False) == [{"k": []}]
    assert _containers(4, "mixed", True) == [{"k": [{"k": 1}]}]
    for count in (1, 2, 5, 64, 65):
        for kind in ("list", "dict", "mixed"):
            assert _depth(_containers(count, kind, False)) == count
            assert _depth(_containers(count, kind, True)) == count


def test_max_depth_is_64() -> None:
    assert MAX_DEPTH == 64


@pytest.mark.parametrize("kind", ["list", "dict", "mixed"])
@pytest.mark.parametrize("scalar", [False, True], ids=["empty", "scalar"])
def test_max_depth_boundary(kind: str, scalar: bool) -> None:
    # The top-level container is depth 0, so MAX_DEPTH nested containers are
    # the most allowed: the innermost sits at depth MAX_DEPTH - 1.
    for count in (MAX_DEPTH - 1, MAX_DEPTH):
        ok = _containers(count, kind, scalar)
        data = canonical_bytes(ok)
        assert data == json.dumps(ok, sort_keys=True, separators=(",", ":")).encode()
        assert _same(parse_canonical(data), ok)
    too_deep = _containers(MAX_DEPTH + 1, kind, scalar)
    with pytest.raises(InvalidInput, match=f"nesting deeper than {MAX_DEPTH}"):
        canonical_bytes(too_deep)
    # The same text is refused by the parser.
    text = json.dumps(too_deep, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(InvalidInput):
        parse_canonical(text)
    # Wrapped in one more container it is still refused.
    with pytest.raises(InvalidInput):
        canonical_bytes({"a": too_deep})


@pytest.mark.parametrize("count", [MAX_DEPTH + 1, MAX_DEPTH + 2, 200])
def test_too_deep_texts_are_refused_by_the_parser(count: int) -> None:
    for data in (b"[" * count + b"]" * count, b'{"k":' * (count - 1) + b"{}" + b"}" * (count - 1)):
        with pytest.raises(InvalidInput):
            parse_canonical(data)
    ok = MAX_DEPTH
    assert _depth(parse_canonical(b"[" * ok + b"]" * ok)) == ok
    assert _depth(parse_canonical(b'{"k":' * (ok - 1) + b"{}" + b"}" * (ok - 1))) == ok


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


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (b'{"a":1,"a":2}', "a"),
        (b'{"a":1,"a":1}', "a"),
        (b'[{"k":{"b":1,"b":2}}]', "b"),
        (b'{"a":1,"b":2,"a":3}', "a"),
        (b'{"b":1,"a":2,"b":3}', "b"),
        (b'{"":1,"":2}', ""),
        ('{"x":{"\u00e9":[],"\u00e9":[]}}'.encode(), "\u00e9"),
    ],
)
def test_duplicate_keys_are_named_as_such(data: bytes, key: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(f"duplicate key {key!r}")):
        parse_canonical(data)


@pytest.mark.parametrize(
    "data",
    [
        b"1" * 4301,
        b"1" * 10_000,
        b"-" + b"1" * 4301,
        b"[" + b"9" * 5000 + b"]",
        b'{"n":' + b"1" * 4301 + b"}",
    ],
    ids=lambda b: f"{len(b)} bytes",
)
def test_parse_rejects_huge_integer_literal(data: bytes) -> None:
    # Beyond Python's int digit limit (4300) json raises ValueError internally.
    with pytest.raises(InvalidInput):
        parse_canonical(data)


def test_parse_rejects_integer_literal_at_the_digit_limit() -> None:
    # Parses as an int, then fails the safe-range check.
    with pytest.raises(InvalidInput, match="safe range"):
        parse_canonical(b"1" * 4300)


# ---------------------------------------------------------------------------
# Properties.
# ---------------------------------------------------------------------------

_SAFE_INTS = st.integers(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER)
# Values may be any Unicode scalar sequence (st.text() excludes surrogates);
# object keys are limited to the Basic Multilingual Plane.
_SCALARS = st.none() | st.booleans() | _SAFE_INTS | st.text()
_BMP = st.characters(max_codepoint=0xFFFF, exclude_categories=("Cs",))


def _keys(max_size: int) -> st.SearchStrategy[str]:
    return st.text(alphabet=_BMP, max_size=max_size)


_JSON = st.recursive(
    _SCALARS,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(_keys(8), children, max_size=5)
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
@given(st.dictionaries(_keys(8), _FLAT, min_size=2, max_size=8), st.randoms())
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
            st.lists(children, max_size=4) | st.dictionaries(_keys(4), children, max_size=4)
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


_NON_BMP_KEYS = st.tuples(_keys(3), st.characters(min_codepoint=0x10000), _keys(3)).map("".join)


def _containers_in(value: Any) -> list[Any]:
    out: list[Any] = []
    if isinstance(value, list | dict):
        out.append(value)
        for item in value if isinstance(value, list) else value.values():
            out.extend(_containers_in(item))
    return out


@st.composite
def _value_with_key_at_some_place(draw: st.DrawFn) -> tuple[Any, Any]:
    """Two copies of one value with the same object key added at the same place.

    The first copy gets a key holding a character beyond U+FFFF; the second
    the same key with those characters replaced by U+FFFF.
    """
    base = draw(_JSON)
    bad_key = draw(_NON_BMP_KEYS)
    good_key = "".join(c if c <= "\uffff" else "\uffff" for c in bad_key)
    item = draw(_SCALARS)
    bad, good = copy.deepcopy(base), copy.deepcopy(base)
    places = _containers_in(bad)
    if not places:
        return {bad_key: item, "x": base}, {good_key: item, "x": base}
    n = draw(st.integers(0, len(places) - 1))
    at = draw(st.integers(0, len(places[n])))  # list position (unused for a dict)
    for value, key in ((bad, bad_key), (good, good_key)):
        target = _containers_in(value)[n]
        if isinstance(target, dict):
            target[key] = item
        else:
            target.insert(at, {key: item})
    return bad, good


@settings(max_examples=150, deadline=None)
@given(_value_with_key_at_some_place())
def test_prop_non_bmp_key_anywhere_is_rejected(pair: tuple[Any, Any]) -> None:
    bad, good = pair
    assume(_depth(bad) <= MAX_DEPTH)
    assert _same(parse_canonical(canonical_bytes(good)), good)
    with pytest.raises(InvalidInput, match="Basic Multilingual Plane"):
        canonical_bytes(bad)
    text = json.dumps(bad, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    with pytest.raises(InvalidInput):
        parse_canonical(text.encode())


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


@given(
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs",)) | st.sampled_from('"\\\x00\x1f\x7f')
    )
)
def test_prop_canonical_text_is_how_a_string_is_written_anywhere(text: str) -> None:
    assert canonical_text(text) == canonical_bytes(text)
    assert b"[" + canonical_text(text) + b"]" == canonical_bytes([text])
    assert canonical_bytes({"k": text}) == b'{"k":' + canonical_text(text) + b"}"
    assert canonical_text(text) == json.dumps(text, ensure_ascii=False).encode()


@pytest.mark.parametrize("value", ["a\ud800", "\udfff", 1, None, b"x"])
def test_canonical_text_refuses_what_is_no_valid_string(value: Any) -> None:
    with pytest.raises(InvalidInput):
        canonical_text(value)
