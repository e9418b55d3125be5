"""Enrollment transactions and the binding rules: every signature and every rule has a negative case."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from medledger.core.enrollment import (
    PATIENT_ENROLL,
    PATIENT_REBIND,
    PATIENT_ROTATE,
    EnrollmentEvent,
    EnrollmentTable,
    enrollment_message,
    rotation_message,
)
from medledger.core.errors import Conflict, InvalidInput, InvalidSignature, MedledgerError
from medledger.core.keys import SigningKey
from medledger.core.models import Transaction

INST = "alpha"
ALICE_PS, BOB_PS = "a1" * 32, "b2" * 32  # keyed pseudonyms of two Patients
OLD, NEW, OTHER = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()


def enroll_body(key: SigningKey, pseudonym: str = ALICE_PS, inst: str = INST) -> dict[str, Any]:
    return {
        "patient": key.fingerprint,
        "pseudonym": pseudonym,
        "patient_key": key.public.der().hex(),
        "signature": key.sign(enrollment_message(inst, pseudonym)).to_json(),
    }


def rotate_body(old: SigningKey, new: SigningKey, pseudonym: str = ALICE_PS) -> dict[str, Any]:
    return enroll_body(new, pseudonym) | {
        "previous": old.fingerprint,
        "previous_key": old.public.der().hex(),
        "previous_signature": old.sign(
            rotation_message(INST, pseudonym, new.fingerprint)
        ).to_json(),
    }


def rebind_body(previous: str, new: SigningKey, actor: str = "admin:0a1b2c") -> dict[str, Any]:
    return enroll_body(new) | {"previous": previous, "actor": actor, "report": "cd" * 32}


def tx(kind: str, body: dict[str, Any]) -> Transaction:
    return Transaction(type=kind, chain=f"private:{INST}", body=body, time_ms=1)


def event(kind: str, body: dict[str, Any]) -> EnrollmentEvent:
    return EnrollmentEvent.from_tx(tx(kind, body), INST)


def test_a_valid_enrollment_rotation_and_rebind_parse() -> None:
    assert event(PATIENT_ENROLL, enroll_body(OLD)) == EnrollmentEvent(
        kind=PATIENT_ENROLL, pseudonym=ALICE_PS, fingerprint=OLD.fingerprint
    )
    rotated = event(PATIENT_ROTATE, rotate_body(OLD, NEW))
    assert (rotated.fingerprint, rotated.previous) == (NEW.fingerprint, OLD.fingerprint)
    rebound = event(PATIENT_REBIND, rebind_body(OLD.fingerprint, NEW))
    assert rebound.actor == "admin:0a1b2c" and rebound.previous == OLD.fingerprint


Mutation = Callable[[dict[str, Any]], Any]


@pytest.mark.parametrize(
    ("kind", "make", "mutate", "error", "reason"),
    [
        # Signed for another institution or another Patient: not this enrollment.
        (PATIENT_ENROLL, lambda: enroll_body(OLD, inst="beta"), None, InvalidSignature, "verify"),
        (
            PATIENT_ENROLL,
            lambda: enroll_body(OLD),
            lambda b: b.update(pseudonym=BOB_PS),
            InvalidSignature,
            "verify|expected",
        ),
        # The key named is not the key that signed / not the fingerprint named.
        (
            PATIENT_ENROLL,
            lambda: enroll_body(OLD),
            lambda b: b.update(patient=NEW.fingerprint),
            InvalidInput,
            "fingerprint",
        ),
        (
            PATIENT_ENROLL,
            lambda: enroll_body(OLD),
            lambda b: b.update(patient_key="zz"),
            InvalidInput,
            "hex DER",
        ),
        (
            PATIENT_ENROLL,
            lambda: enroll_body(OLD),
            lambda b: b.update(extra=1),
            InvalidInput,
            "exactly",
        ),
        # A rotation must be signed by the previous key, for exactly this new key.
        (
            PATIENT_ROTATE,
            lambda: rotate_body(OLD, NEW),
            lambda b: b.update(
                previous_signature=OTHER.sign(
                    rotation_message(INST, ALICE_PS, NEW.fingerprint)
                ).to_json()
            ),
            InvalidSignature,
            "verify|expected",
        ),
        (
            PATIENT_ROTATE,
            lambda: rotate_body(OLD, NEW),
            lambda b: b.update(
                previous_signature=OLD.sign(
                    rotation_message(INST, ALICE_PS, OTHER.fingerprint)
                ).to_json()
            ),
            InvalidSignature,
            "verify|expected",
        ),
        (
            PATIENT_ROTATE,
            lambda: rotate_body(OLD, NEW),
            lambda b: b.update(previous=OTHER.fingerprint),
            InvalidInput,
            "fingerprint",
        ),
        # A break-glass names an admin token, and the new key still signs.
        (
            PATIENT_REBIND,
            lambda: rebind_body(OLD.fingerprint, NEW, actor="clinician:0a1b2c"),
            None,
            InvalidInput,
            "admin",
        ),
        (
            PATIENT_REBIND,
            lambda: rebind_body(OLD.fingerprint, NEW),
            lambda b: b.update(signature=OTHER.sign(b"x").to_json()),
            InvalidSignature,
            "verify|expected",
        ),
        # An unsigned enrollment (as written before enrollments were signed).
        (
            PATIENT_ENROLL,
            lambda: {"patient": "a" * 64, "pseudonym": ALICE_PS},
            None,
            InvalidInput,
            "exactly",
        ),
    ],
)
def test_a_transaction_without_the_right_signatures_is_refused(
    kind: str,
    make: Callable[[], dict[str, Any]],
    mutate: Mutation | None,
    error: type[MedledgerError],
    reason: str,
) -> None:
    body = make()
    if mutate is not None:
        mutate(body)
    with pytest.raises(error, match=reason):
        event(kind, body)


def test_one_key_per_patient_one_patient_per_key() -> None:
    table = EnrollmentTable()
    table.apply(event(PATIENT_ENROLL, enroll_body(OLD)), b"\x01" * 32)
    assert table.of_pseudonym(ALICE_PS).fingerprint == OLD.fingerprint  # type: ignore[union-attr]
    assert table.of_fingerprint(OLD.fingerprint).pseudonym == ALICE_PS  # type: ignore[union-attr]
    # Re-enrolling Alice to any key (a clinician's, say) needs rotation or break-glass.
    with pytest.raises(Conflict, match="already enrolled"):
        table.check(event(PATIENT_ENROLL, enroll_body(OTHER)))
    # Alice's key cannot become Bob's too.
    with pytest.raises(Conflict, match="another patient"):
        table.check(event(PATIENT_ENROLL, enroll_body(OLD, BOB_PS)))
    # A re-binding must start from the key bound now.
    with pytest.raises(Conflict, match="bound now"):
        table.check(event(PATIENT_ROTATE, rotate_body(OTHER, NEW)))
    with pytest.raises(Conflict, match="bound now"):
        table.check(event(PATIENT_REBIND, rebind_body(OTHER.fingerprint, NEW)))
    with pytest.raises(Conflict, match="bound now"):
        table.check(event(PATIENT_ROTATE, rotate_body(OLD, NEW, BOB_PS)))

    table.apply(event(PATIENT_ROTATE, rotate_body(OLD, NEW)), b"\x02" * 32)
    assert table.of_fingerprint(OLD.fingerprint) is None
    assert table.of_pseudonym(ALICE_PS).fingerprint == NEW.fingerprint  # type: ignore[union-attr]
    assert len(table) == 1
    # A retired key is never bound again here, to anyone.
    with pytest.raises(Conflict, match="another patient"):
        table.check(event(PATIENT_ENROLL, enroll_body(OLD, BOB_PS)))
    with pytest.raises(Conflict, match="already bound to this key"):
        table.check(event(PATIENT_REBIND, rebind_body(NEW.fingerprint, OLD)))


def test_replay_names_the_transaction_that_breaks_the_rules() -> None:
    table = EnrollmentTable()
    first = tx(PATIENT_ENROLL, enroll_body(OLD))
    table.replay(first, first.hash(), INST)
    second = tx(PATIENT_ENROLL, enroll_body(OTHER))
    with pytest.raises(InvalidInput, match=second.hash().hex()):
        table.replay(second, second.hash(), INST)
    assert table.of_pseudonym(ALICE_PS).fingerprint == OLD.fingerprint  # type: ignore[union-attr]
