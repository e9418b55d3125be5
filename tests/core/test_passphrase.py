"""Tests for :mod:`medledger.core.passphrase`: the floor for a newly set passphrase."""

from __future__ import annotations

import pytest

from medledger.core.errors import InvalidInput
from medledger.core.passphrase import MIN_CHARACTERS, MIN_DISTINCT, check_new_passphrase


@pytest.mark.parametrize(
    "good",
    [
        "correct horse battery staple",
        "abcdefghijkl",  # exactly the minimum
        "  abcdefghijkl  ",  # surrounding spaces do not hurt
        "aaaaaaaabcde",  # exactly the distinct minimum
        "Blutdruck-Zuckerwürfel",  # any UTF-8
        "пароль пароль",
    ],
)
def test_strong_enough(good: str) -> None:
    check_new_passphrase(good.encode())


@pytest.mark.parametrize(
    "weak",
    [
        b"",
        b"a",
        b" ",  # a single space
        b" " * 64,  # whitespace only
        b"\t\n \r",
        b"abcdefghijk",  # one short
        b"   abcdefghijk   ",  # the spaces do not make up for it
        b"a" * 64,  # one character repeated
        b"abababababababab",
        b"aaaaaaaabcd",
        b"abcdabcdabcdabcd",  # four distinct
    ],
)
def test_too_weak(weak: bytes) -> None:
    with pytest.raises(InvalidInput, match=f"too weak: use at least {MIN_CHARACTERS} characters"):
        check_new_passphrase(weak, what="keystore passphrase")


def test_the_message_names_what_and_never_echoes_the_passphrase() -> None:
    with pytest.raises(InvalidInput) as caught:
        check_new_passphrase(b"hunter2", what="wallet passphrase")
    message = str(caught.value)
    assert message.startswith("the wallet passphrase is too weak")
    assert "hunter2" not in message and str(MIN_DISTINCT) in message


def test_not_utf8_is_refused() -> None:
    with pytest.raises(InvalidInput, match="not valid UTF-8"):
        check_new_passphrase(b"\xff\xfe long enough but not text")
