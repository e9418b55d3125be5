"""Canonical JSON: the byte form that every hash and signature in medledger covers.

The format is fixed (DESIGN.md, "Fixed formats")::

    json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

over ``str``, ``int``, ``bool``, ``None``, ``list`` and ``dict`` with ``str`` keys
only. On that subset this is RFC 8785 (JCS) output. Floats are rejected because
their text form is not unique across implementations; so are non-string keys,
strings that are not valid Unicode scalar sequences (lone surrogates), and
integers outside the IEEE-754 safe range (|n| > 2**53 - 1), which JCS
implementations in other languages could not round-trip.
"""

from __future__ import annotations

import json
from typing import Any, TypeAlias

import orjson

from medledger.core.errors import InvalidInput

__all__ = [
    "JSONValue",
    "MAX_DEPTH",
    "MAX_SAFE_INTEGER",
    "canonical_bytes",
    "canonical_bytes_of_checked",
    "canonical_text",
    "parse_canonical",
    "parse_strict",
]

JSONValue: TypeAlias = "bool | int | str | list[JSONValue] | dict[str, JSONValue] | None"

MAX_SAFE_INTEGER = 2**53 - 1
#: Nesting deeper than this is refused: it protects parsers (ours and the
#: auditors') from stack exhaustion and no medledger object needs it.
MAX_DEPTH = 64


def _check(value: Any, path: str, depth: int) -> None:
    """Slow, precise validation: raises :class:`InvalidInput` naming the JSON path."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            raise InvalidInput(f"canonical JSON: integer outside the safe range at {path}")
        return
    if isinstance(value, str):
        _check_str(value, path)
        return
    if isinstance(value, float):
        raise InvalidInput(f"canonical JSON: floats are not allowed (at {path})")
    if not isinstance(value, list | tuple | dict):
        raise InvalidInput(f"canonical JSON: unsupported type {type(value).__name__} at {path}")
    if depth >= MAX_DEPTH:
        raise InvalidInput(f"canonical JSON: nesting deeper than {MAX_DEPTH} at {path}")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidInput(f"canonical JSON: non-string key {key!r} at {path}")
            _check_str(key, path)
            if not _bmp_key(key):
                raise InvalidInput(
                    f"canonical JSON: object key outside the Basic Multilingual Plane at {path}"
                )
            _check(item, f"{path}.{key}", depth + 1)
        return
    for i, item in enumerate(value):
        _check(item, f"{path}[{i}]", depth + 1)


def _check_str(value: str, path: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"canonical JSON: string is not valid Unicode at {path}") from None


def _bmp_key(key: str) -> bool:
    # Python sorts keys by code point, RFC 8785 by UTF-16 code unit; the two
    # orders agree exactly when no key has a character beyond U+FFFF.
    return key.isascii() or max(key) <= "\uffff"


def _plain(value: Any, depth: int) -> bool:
    """Fast acceptance test on exact built-in types; ``False`` means "look closer".

    Unicode validity is left to the final UTF-8 encode, which raises on lone
    surrogates; :func:`_check` then finds the path for the error message.
    Containers nest at most :data:`MAX_DEPTH` deep (the top level is depth 0).
    """
    t = type(value)
    if t is str or t is bool or value is None:
        return True
    if t is int:
        return bool(-MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER)
    if depth >= MAX_DEPTH:
        return False
    if t is dict:
        for key, item in value.items():
            if type(key) is not str or not _bmp_key(key):
                return False
            if type(item) is not str and not _plain(item, depth + 1):
                return False
        return True
    if t is list or t is tuple:
        return all(type(item) is str or _plain(item, depth + 1) for item in value)
    return False


def canonical_bytes(value: Any) -> bytes:
    """Return the canonical JSON bytes of ``value``.

    Raises :class:`InvalidInput` (naming the JSON path) for floats, NaN,
    non-string keys, lone surrogates, unsafe integers, nesting deeper than
    :data:`MAX_DEPTH` or any type outside the JSON subset. Tuples encode as lists.
    """
    if not _plain(value, 0):
        _check(value, "$", 0)
    try:
        # orjson produces exactly the bytes of the formula above on this subset
        # (a property test holds it to json.dumps) at a tenth of the cost.
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # a lone surrogate: find it for the message
        _check(value, "$", 0)
        raise InvalidInput("canonical JSON: string is not valid Unicode") from None


def canonical_bytes_of_checked(value: Any) -> bytes:
    """Canonical bytes of a value made only of parts :func:`canonical_bytes` accepted.

    For re-encoding a sub-structure of a value that was already checked (e.g.
    a transaction without its signatures): the same bytes, without the walk.
    """
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def canonical_text(value: str) -> bytes:
    """The canonical JSON of one string, quotes included: exactly the bytes
    :func:`canonical_bytes` writes for it wherever it stands in a value.

    For encoders that lay out a fixed shape of object themselves (keys in
    sorted order, values inserted), such as an ``access`` transaction's. Raises
    :class:`InvalidInput` for a value that is not a string or holds a lone surrogate.
    """
    if not isinstance(value, str):
        raise InvalidInput(f"canonical JSON: expected a string, not {type(value).__name__}")
    try:
        # The same encoder as canonical_bytes: a string's escaping does not depend on
        # where it stands.
        return orjson.dumps(value)
    except TypeError:
        raise InvalidInput("canonical JSON: string is not valid Unicode") from None


def _reject_float(text: str) -> Any:
    raise InvalidInput(f"canonical JSON: floats are not allowed ({text})")


def _reject_constant(text: str) -> Any:
    raise InvalidInput(f"canonical JSON: {text} is not allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidInput(f"canonical JSON: duplicate key {key!r}")
        out[key] = value
    return out


# Built once: constructing a decoder per call was a measurable share of
# verifying a large chain.
_STRICT = json.JSONDecoder(
    parse_float=_reject_float, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates
)


def _decode(decoder: json.JSONDecoder, text: str) -> Any:
    try:
        return decoder.decode(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"canonical JSON: {exc.msg} at byte {exc.pos}") from None
    except RecursionError:
        raise InvalidInput("canonical JSON: nesting too deep") from None
    except ValueError as exc:  # e.g. an integer literal beyond Python's digit limit
        raise InvalidInput(f"canonical JSON: {exc}") from None


def parse_strict(text: str) -> Any:
    """Parse JSON text that need not be canonical, but holds only the canonical subset.

    For documents whose bytes are not hashed as they are (an export line, an
    evidence record): floats, NaN/Infinity and duplicate keys are refused with
    :class:`InvalidInput`, as they are in canonical bytes.
    """
    return _decode(_STRICT, text)


def parse_canonical(data: bytes) -> Any:
    """Parse bytes that must already be canonical JSON and return the value.

    Raises :class:`InvalidInput` for invalid UTF-8, invalid JSON, floats, NaN,
    duplicate keys, or any byte sequence that is not exactly the canonical
    encoding of the value it denotes (so a hash over ``data`` is unambiguous).
    """
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        # Explain the failure with the standard parser (precise position and reason).
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"canonical JSON: invalid UTF-8 at byte {exc.start}") from None
        # orjson also refuses some valid JSON (e.g. integers beyond 64 bits),
        # which the canonical check below then rejects with its own reason.
        value = _decode(_STRICT, text)
    text = ""
    # Duplicate keys cannot survive this comparison (the re-encoding has each
    # key once), so the slower duplicate-detecting parse runs only to explain
    # a failure.
    if canonical_bytes(value) != data:
        _decode(_STRICT, text or data.decode("utf-8"))
        raise InvalidInput("canonical JSON: bytes are valid JSON but not in canonical form")
    return value
