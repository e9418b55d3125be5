"""Access entries hold only derived values; refusal reasons are fixed sentences.

An access entry is signed, anchored and never erased, so what it may hold is
checked where it is built: request text of any kind is refused, and a refusal
is recorded as one of medledger's own sentences, whatever the error said.
"""

from __future__ import annotations

import re

import pytest
from access_values import VALID
from hypothesis import given
from hypothesis import strategies as st

from medledger.core.errors import (
    ConsentDenied,
    Gone,
    IntegrityError,
    InvalidInput,
    InvalidSignature,
    MedledgerError,
    NotFound,
    OrderingError,
    RateLimited,
    StorageError,
)
from medledger.services.access import ALLOWED, REASONS, REFUSED, AccessEntry, refusal_reason

PHI = "John Smith, born 1970-01-01, SSN 078-05-1120, HIV positive"


def errors(message: str) -> list[MedledgerError]:
    return [
        ConsentDenied(message),
        Gone(message),
        NotFound(message),
        IntegrityError(message),
        InvalidSignature(message),
        InvalidInput(message),
        OrderingError(message),
        StorageError(message),
        RateLimited(message, retry_after_ms=5),
        MedledgerError(message),
    ]


def test_a_fully_derived_entry_is_accepted() -> None:
    entry = AccessEntry(**VALID)
    assert entry.private_body()["reason"] == "the consent has expired"
    AccessEntry(**{**VALID, "patient": "", "consent": "", "resource": "list", "reason": ""})
    AccessEntry(**{**VALID, "outcome": ALLOWED, "actor": "", "request": "", "resource": ""})


@pytest.mark.parametrize("field", sorted(VALID))
def test_phi_in_any_field_is_refused(field: str) -> None:
    with pytest.raises(InvalidInput, match=f"access entry {field} is not a value") as caught:
        AccessEntry(**{**VALID, field: PHI})
    assert "Smith" not in str(caught.value)


def test_a_word_shaped_like_a_type_is_no_type() -> None:
    with pytest.raises(InvalidInput, match="access entry resource"):
        AccessEntry(**{**VALID, "resource": f"JaneRoeHasCarcinoma:{'ef' * 32}"})


@given(field=st.sampled_from(sorted(VALID)), text=st.text(max_size=80))
def test_no_free_text_passes_for_a_derived_value(field: str, text: str) -> None:
    """Anything accepted has the shape of a member id, hash, keyed reference or fixed reason."""
    try:
        entry = AccessEntry(**{**VALID, field: text})
    except InvalidInput:
        return
    value = entry.private_body()[field]
    shapes = {
        "reader": lambda v: re.fullmatch(r"[a-z0-9-]{1,63}", v),
        "holder": lambda v: re.fullmatch(r"[a-z0-9-]{1,63}", v),
        "patient": lambda v: v == "" or len(v) == 64,
        "consent": lambda v: v == "" or len(v) == 64,
        "request": lambda v: v == "" or len(v) == 64,
        "resource": lambda v: v in ("", "list") or len(v.split(":")[1]) == 64,
        "outcome": lambda v: v in (ALLOWED, REFUSED),
        "reason": lambda v: v == "" or v in REASONS,
        "actor": lambda v: v == "" or (":" in v and " " not in v),
    }
    assert shapes[field](value), (field, value)


@given(message=st.text(max_size=300))
def test_every_refusal_is_recorded_as_a_fixed_sentence(message: str) -> None:
    for exc in errors(message):
        reason = refusal_reason(exc)
        assert reason in REASONS
        AccessEntry(**{**VALID, "reason": reason})


def test_request_text_in_an_error_message_never_reaches_the_reason() -> None:
    quoted = [
        f"the consent was granted to hospital-3, not {PHI}",
        f"the consent does not cover {PHI} resources",
        f"{PHI!r} is not a consortium member",
        f"the request is addressed to {PHI!r}",
        f"holder refused (403): {PHI}",
        f"Observation/{PHI} was erased",
        f"no resource Observation/{PHI}",
    ]
    for message in quoted:
        for exc in errors(message):
            assert "Smith" not in refusal_reason(exc), message


def test_our_fixed_messages_keep_their_meaning() -> None:
    cases = [
        (ConsentDenied("the consent was revoked by the patient"), "revoked by the patient"),
        (ConsentDenied("the consent was granted to gamma, not beta"), "granted to another member"),
        (ConsentDenied("the consent does not cover Observation resources"), "does not cover"),
        (InvalidInput("the request nonce was already used (replay)"), "replay"),
        (InvalidInput("the request timestamp is outside the allowed skew of 30000 ms"), "skew"),
        (ConsentDenied("holder refused (403): the consent has expired"), "has expired"),
        (ConsentDenied("the consent's period has not started yet"), "has not started yet"),
        (Gone("Observation/x was erased"), "the record was erased"),
        (NotFound("Observation/x not found"), "no such record"),
        (RateLimited("anything", retry_after_ms=1), "throttling"),
    ]
    for exc, expected in cases:
        assert expected in refusal_reason(exc), exc
