"""Tests for :mod:`medledger.core.consent`: parsing, signatures and authorization of consents.

Every rejection is probed with a body that is otherwise well-formed and
correctly signed by the patient (re-signed after the change), so the check
under test is the only one that can fail.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from medledger.core.consent import (
    ALL_TYPES,
    CONSENT_GRANT,
    CONSENT_REVOKE,
    CONSENT_TYPES,
    PURPOSES,
    ConsentGrant,
    ConsentRecord,
    ConsentRevoke,
    grant_tx,
    revoke_tx,
)
from medledger.core.errors import (
    ConsentDenied,
    InvalidInput,
    InvalidSignature,
    MedledgerError,
)
from medledger.core.keys import SigningKey
from medledger.core.models import Transaction

CHAIN = "consortium:demo"
T0 = 1_700_000_000_000
EXPIRES = T0 + 86_400_000
PATIENT = SigningKey.generate()
OTHER = SigningKey.generate()
GRANT_HASH = bytes(range(32))


def _grant(**overrides: Any) -> Transaction:
    args: dict[str, Any] = {
        "chain": CHAIN,
        "grantee": "beta",
        "scope": ["Observation", "Condition"],
        "purpose": "TREAT",
        "expires_ms": EXPIRES,
        "time_ms": T0,
    }
    args.update(overrides)
    return grant_tx(PATIENT, **args)


def _signed(
    tx_type: str,
    body: dict[str, Any],
    *keys: SigningKey,
    time_ms: int = T0,
) -> Transaction:
    """A transaction with ``body`` signed by ``keys`` (the patient by default)."""
    tx = Transaction(type=tx_type, chain=CHAIN, body=body, time_ms=time_ms)
    signers = keys or (PATIENT,)
    return replace(tx, signatures=tuple(k.sign(tx.signing_bytes()) for k in signers))


def _grant_body() -> dict[str, Any]:
    return copy.deepcopy(_grant().body)


def _revoke_body() -> dict[str, Any]:
    return copy.deepcopy(revoke_tx(PATIENT, chain=CHAIN, grant=GRANT_HASH, time_ms=T0).body)


def _p384_key_hex() -> str:
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der.hex()


# ---------------------------------------------------------------------------
# ConsentGrant: the well-formed case
# ---------------------------------------------------------------------------


def test_grant_tx_parses_to_its_fields() -> None:
    tx = _grant()
    assert tx.type == CONSENT_GRANT and tx.chain == CHAIN and tx.time_ms == T0
    assert tx.body["patient"] == PATIENT.fingerprint
    assert tx.body["patient_key"] == PATIENT.public.der().hex()
    assert len(tx.signatures) == 1 and tx.signatures[0].signer == PATIENT.fingerprint
    PATIENT.public.verify(tx.signatures[0], tx.signing_bytes())
    grant = ConsentGrant.from_tx(tx)
    assert grant == ConsentGrant(
        patient=PATIENT.fingerprint,
        grantee="beta",
        scope=("Observation", "Condition"),
        purpose="TREAT",
        expires_ms=EXPIRES,
        time_ms=T0,
        starts_ms=T0,  # no starts_ms in the body: the period starts at the grant
    )
    assert "starts_ms" not in tx.body  # a grant without a start keeps its old bytes
    assert {CONSENT_GRANT, CONSENT_REVOKE} == CONSENT_TYPES


def test_grant_survives_a_json_round_trip() -> None:
    tx = _grant()
    again = Transaction.decode(tx.encode())
    assert again == tx
    assert ConsentGrant.from_tx(again) == ConsentGrant.from_tx(tx)


@pytest.mark.parametrize("purpose", sorted(PURPOSES))
def test_every_purpose_of_use_code_is_accepted(purpose: str) -> None:
    assert ConsentGrant.from_tx(_grant(purpose=purpose)).purpose == purpose


@pytest.mark.parametrize(
    "scope",
    [
        [ALL_TYPES],
        ["Observation"],
        ["Ab"],  # shortest type name
        ["A" + "b" * 63],  # longest type name (64 characters)
        [f"Type{chr(65 + i // 26)}{chr(97 + i % 26)}" for i in range(64)],  # 64 entries
    ],
    ids=["star", "one", "short-name", "long-name", "64-entries"],
)
def test_scope_boundaries_accepted(scope: list[str]) -> None:
    assert ConsentGrant.from_tx(_grant(scope=scope)).scope == tuple(scope)


@pytest.mark.parametrize("grantee", ["a", "0", "h1", "st-mary-2", "a" * 63])
def test_grantee_boundaries_accepted(grantee: str) -> None:
    assert ConsentGrant.from_tx(_grant(grantee=grantee)).grantee == grantee


def test_expiry_one_millisecond_after_the_grant_is_accepted() -> None:
    assert ConsentGrant.from_tx(_grant(expires_ms=T0 + 1)).expires_ms == T0 + 1


def test_covers() -> None:
    grant = ConsentGrant.from_tx(_grant())
    assert grant.covers("Observation") and grant.covers("Condition")
    assert not grant.covers("MedicationRequest")
    assert not grant.covers("observation")
    everything = ConsentGrant.from_tx(_grant(scope=[ALL_TYPES]))
    assert all(everything.covers(t) for t in ("Observation", "Patient", "Anything"))


# ---------------------------------------------------------------------------
# ConsentGrant: rejections
# ---------------------------------------------------------------------------


Mutation = Callable[[dict[str, Any]], object]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b.pop("purpose"), "must have exactly"),
        (lambda b: b.pop("patient_key"), "must have exactly"),
        (lambda b: b.update(note="hello"), "must have exactly"),
        (lambda b: b.update(grant="00" * 32), "must have exactly"),
        (lambda b: b.update(patient=OTHER.fingerprint), "not the fingerprint"),
        (lambda b: b.update(patient_key=OTHER.public.der().hex()), "not the fingerprint"),
        (lambda b: b.update(patient="00" * 32), "not the fingerprint"),
        (lambda b: b.update(patient=5), "must be strings"),
        (lambda b: b.update(patient_key=None), "must be strings"),
        (lambda b: b.update(patient_key="zz" * 40), "not a hex DER public key"),
        (lambda b: b.update(patient_key="00" * 40), "DER public key"),
        (lambda b: b.update(patient_key=_p384_key_hex()), "P-256"),
    ],
    ids=[
        "missing-purpose",
        "missing-patient-key",
        "extra-field",
        "revoke-field",
        "patient-other-fingerprint",
        "patient-key-other-key",
        "patient-zero",
        "patient-int",
        "patient-key-none",
        "patient-key-not-hex",
        "patient-key-not-der",
        "patient-key-p384",
    ],
)
def test_grant_shape_and_patient_key_rejections(mutate: Mutation, reason: str) -> None:
    body = _grant_body()
    mutate(body)
    with pytest.raises(InvalidInput, match=reason):
        ConsentGrant.from_tx(_signed(CONSENT_GRANT, body))


def test_grant_with_the_revoke_type_is_refused() -> None:
    with pytest.raises(InvalidInput, match=r"consent\.grant must have exactly"):
        ConsentGrant.from_tx(_signed(CONSENT_REVOKE, _grant_body()))
    with pytest.raises(InvalidInput, match=r"consent\.revoke must have exactly"):
        ConsentRevoke.from_tx(_grant())


def test_grant_signed_by_another_key_is_refused() -> None:
    with pytest.raises(InvalidSignature, match="exactly one signature, the patient's"):
        ConsentGrant.from_tx(_signed(CONSENT_GRANT, _grant_body(), OTHER))


def test_grant_naming_another_patient_consistently_but_signed_by_ours_is_refused() -> None:
    body = _grant_body()
    body.update(patient=OTHER.fingerprint, patient_key=OTHER.public.der().hex())
    with pytest.raises(InvalidSignature):
        ConsentGrant.from_tx(_signed(CONSENT_GRANT, body, PATIENT))


@pytest.mark.parametrize(
    "signers",
    [(), (PATIENT, PATIENT), (PATIENT, OTHER), (OTHER, PATIENT)],
    ids=["unsigned", "twice", "patient-and-other", "other-and-patient"],
)
def test_grant_must_carry_exactly_the_patients_signature(signers: tuple[SigningKey, ...]) -> None:
    tx = Transaction(type=CONSENT_GRANT, chain=CHAIN, body=_grant_body(), time_ms=T0)
    tx = replace(tx, signatures=tuple(k.sign(tx.signing_bytes()) for k in signers))
    with pytest.raises(InvalidSignature, match="exactly one signature"):
        ConsentGrant.from_tx(tx)
    # The signer count and identity are checked even when signatures are not verified.
    with pytest.raises(InvalidSignature, match="exactly one signature"):
        ConsentGrant.from_tx(tx, verify_signature=False)


def test_grant_altered_after_signing_is_refused_unless_verification_is_skipped() -> None:
    tx = _grant()
    altered = replace(tx, body={**tx.body, "grantee": "gamma"})
    with pytest.raises(InvalidSignature, match="does not verify"):
        ConsentGrant.from_tx(altered)
    # State replay (apply of an already-checked tx) parses without re-verifying.
    assert ConsentGrant.from_tx(altered, verify_signature=False).grantee == "gamma"


def test_grant_with_a_corrupt_signature_is_refused() -> None:
    tx = _grant()
    sig = tx.signatures[0]
    raw = bytearray(sig.sig)
    raw[-1] ^= 1
    with pytest.raises(InvalidSignature):
        ConsentGrant.from_tx(replace(tx, signatures=(replace(sig, sig=bytes(raw)),)))


@pytest.mark.parametrize(
    "grantee",
    ["", "Beta", "-beta", "be_ta", "beta.example", "be ta", "a" * 64, 5, None, ["beta"]],
)
def test_bad_grantee_is_refused(grantee: Any) -> None:
    body = _grant_body()
    body["grantee"] = grantee
    with pytest.raises(InvalidInput, match="grantee must be a member id"):
        ConsentGrant.from_tx(_signed(CONSENT_GRANT, body))


_SCOPE_REASON = "scope must be distinct FHIR resource types"


@pytest.mark.parametrize(
    ("scope", "reason"),
    [
        ([], _SCOPE_REASON),
        ("Observation", _SCOPE_REASON),
        (None, _SCOPE_REASON),
        ({"Observation": 1}, _SCOPE_REASON),
        (["Observation", "Observation"], _SCOPE_REASON),
        ([ALL_TYPES, ALL_TYPES], _SCOPE_REASON),
        ([ALL_TYPES, "Observation"], "'\\*' stands alone"),
        (["Observation", ALL_TYPES], "'\\*' stands alone"),
        (["observation"], _SCOPE_REASON),
        (["O"], _SCOPE_REASON),
        (["Obs1"], _SCOPE_REASON),
        (["Obs-ervation"], _SCOPE_REASON),
        (["Observation "], _SCOPE_REASON),
        (["A" + "b" * 64], _SCOPE_REASON),
        (["**"], _SCOPE_REASON),
        ([5], _SCOPE_REASON),
        ([None], _SCOPE_REASON),
        ([["Observation"]], _SCOPE_REASON),
        ([f"Type{chr(65 + i // 26)}{chr(97 + i % 26)}" for i in range(65)], _SCOPE_REASON),
    ],
    ids=[
        "empty",
        "string",
        "none",
        "dict",
        "duplicate",
        "duplicate-star",
        "star-first-mixed",
        "star-last-mixed",
        "lowercase",
        "one-letter",
        "digit",
        "dash",
        "trailing-space",
        "65-characters",
        "double-star",
        "int-entry",
        "none-entry",
        "list-entry",
        "65-entries",
    ],
)
def test_bad_scope_is_refused(scope: Any, reason: str) -> None:
    body = _grant_body()
    body["scope"] = scope
    with pytest.raises(InvalidInput, match=reason):
        ConsentGrant.from_tx(_signed(CONSENT_GRANT, body))


@pytest.mark.parametrize("purpose", ["treat", "TREATMENT", "", "treatment", None, 1])
def test_unknown_purpose_is_refused(purpose: Any) -> None:
    body = _grant_body()
    body["purpose"] = purpose
    with pytest.raises(InvalidInput, match="purpose must be one of"):
        ConsentGrant.from_tx(_signed(CONSENT_GRANT, body))


@pytest.mark.parametrize(
    "expires",
    [T0, T0 - 1, 0, True, False, str(EXPIRES), None, [EXPIRES]],
    ids=["equal", "before", "zero", "true", "false", "string", "none", "list"],
)
def test_bad_expiry_is_refused(expires: Any) -> None:
    body = _grant_body()
    body["expires_ms"] = expires
    with pytest.raises(InvalidInput, match="expires_ms must be a time after the grant"):
        ConsentGrant.from_tx(_signed(CONSENT_GRANT, body))


@pytest.mark.parametrize("expires", [float(EXPIRES), EXPIRES + 0.5], ids=["integral", "fraction"])
def test_float_expiry_is_refused(expires: float) -> None:
    """A float cannot even be signed (canonical JSON has no floats); the rule refuses it too."""
    tx = replace(_grant(), body={**_grant_body(), "expires_ms": expires})
    with pytest.raises(InvalidInput, match="floats are not allowed"):
        ConsentGrant.from_tx(tx)
    with pytest.raises(InvalidInput, match="expires_ms must be a time after the grant"):
        ConsentGrant.from_tx(tx, verify_signature=False)


def test_expiry_is_compared_with_the_grant_time() -> None:
    body = _grant_body()
    body["expires_ms"] = T0 + 10
    assert ConsentGrant.from_tx(_signed(CONSENT_GRANT, body, time_ms=T0 + 9)).time_ms == T0 + 9
    with pytest.raises(InvalidInput, match="expires_ms"):
        ConsentGrant.from_tx(_signed(CONSENT_GRANT, body, time_ms=T0 + 10))


def test_grant_tx_refuses_to_build_a_bad_grant() -> None:
    with pytest.raises(InvalidInput, match="scope"):
        _grant(scope=[])
    with pytest.raises(InvalidInput, match="purpose"):
        _grant(purpose="NOPE")
    with pytest.raises(InvalidInput, match="expires_ms"):
        _grant(expires_ms=T0)


# ---------------------------------------------------------------------------
# ConsentRevoke
# ---------------------------------------------------------------------------


def test_revoke_tx_parses() -> None:
    tx = revoke_tx(PATIENT, chain=CHAIN, grant=GRANT_HASH, time_ms=T0 + 5)
    assert tx.type == CONSENT_REVOKE and tx.time_ms == T0 + 5
    assert tx.body == {
        "patient": PATIENT.fingerprint,
        "patient_key": PATIENT.public.der().hex(),
        "grant": GRANT_HASH.hex(),
    }
    assert ConsentRevoke.from_tx(tx) == ConsentRevoke(patient=PATIENT.fingerprint, grant=GRANT_HASH)
    assert ConsentRevoke.from_tx(Transaction.decode(tx.encode())).grant == GRANT_HASH


@pytest.mark.parametrize(
    ("mutate", "error", "reason"),
    [
        (lambda b: b.pop("grant"), InvalidInput, "must have exactly"),
        (lambda b: b.update(scope=["Observation"]), InvalidInput, "must have exactly"),
        (lambda b: b.update(patient=OTHER.fingerprint), InvalidInput, "not the fingerprint"),
        (lambda b: b.update(patient_key="not hex"), InvalidInput, "not a hex DER"),
        (lambda b: b.update(grant="00" * 31), InvalidInput, "64 hex characters"),
        (lambda b: b.update(grant="AB" * 32), InvalidInput, "lowercase"),
        (lambda b: b.update(grant="zz" * 32), InvalidInput, "not hex"),
        (lambda b: b.update(grant=None), InvalidInput, "64 hex characters"),
    ],
    ids=[
        "missing-grant",
        "extra-field",
        "patient-mismatch",
        "patient-key-not-hex",
        "grant-short",
        "grant-uppercase",
        "grant-not-hex",
        "grant-none",
    ],
)
def test_revoke_rejections(mutate: Mutation, error: type[Exception], reason: str) -> None:
    body = _revoke_body()
    mutate(body)
    with pytest.raises(error, match=reason):
        ConsentRevoke.from_tx(_signed(CONSENT_REVOKE, body))


def test_revoke_signature_rules() -> None:
    body = _revoke_body()
    with pytest.raises(InvalidSignature, match="exactly one signature"):
        ConsentRevoke.from_tx(_signed(CONSENT_REVOKE, body, OTHER))
    with pytest.raises(InvalidSignature, match="exactly one signature"):
        ConsentRevoke.from_tx(_signed(CONSENT_REVOKE, body, PATIENT, PATIENT))
    tx = _signed(CONSENT_REVOKE, body)
    altered = replace(tx, body={**body, "grant": "11" * 32})
    with pytest.raises(InvalidSignature, match="does not verify"):
        ConsentRevoke.from_tx(altered)
    assert ConsentRevoke.from_tx(altered, verify_signature=False).grant == b"\x11" * 32


# ---------------------------------------------------------------------------
# ConsentRecord.authorize
# ---------------------------------------------------------------------------


def _record(revoked_height: int | None = None, **grant: Any) -> ConsentRecord:
    return ConsentRecord(
        tx_hash=GRANT_HASH,
        grant=ConsentGrant.from_tx(_grant(**grant)),
        height=4,
        revoked_height=revoked_height,
    )


def _authorize(record: ConsentRecord, **overrides: Any) -> None:
    args: dict[str, Any] = {
        "reader": "beta",
        "patient": PATIENT.fingerprint,
        "resource_type": "Observation",
        "now_ms": T0 + 1,
    }
    args.update(overrides)
    record.authorize(**args)


def test_authorize_allows_the_grantee_within_scope_and_time() -> None:
    record = _record()
    _authorize(record)
    _authorize(record, resource_type="Condition")
    _authorize(record, now_ms=T0)  # from the grant's own time
    _authorize(record, now_ms=EXPIRES - 1)  # until the last millisecond


@pytest.mark.parametrize(
    ("record", "overrides", "reason"),
    [
        (_record(revoked_height=9), {}, "revoked by the patient"),
        (_record(), {"patient": OTHER.fingerprint}, "another patient"),
        (_record(), {"reader": "gamma"}, "granted to beta, not gamma"),
        (_record(), {"now_ms": EXPIRES}, "expired"),
        (_record(), {"now_ms": EXPIRES + 1}, "expired"),
        (_record(), {"resource_type": "MedicationRequest"}, "does not cover MedicationRequest"),
        (_record(), {"resource_type": ALL_TYPES}, "does not cover"),
        (_record(revoked_height=0), {}, "revoked"),
    ],
    ids=[
        "revoked",
        "other-patient",
        "other-grantee",
        "expired-at-boundary",
        "expired-after",
        "out-of-scope",
        "star-is-not-a-type",
        "revoked-at-height-zero",
    ],
)
def test_authorize_refusals(record: ConsentRecord, overrides: dict[str, Any], reason: str) -> None:
    with pytest.raises(ConsentDenied, match=reason):
        _authorize(record, **overrides)


def test_revocation_is_reported_before_anything_else() -> None:
    record = _record(revoked_height=5)
    with pytest.raises(ConsentDenied, match="revoked"):
        _authorize(record, reader="gamma", now_ms=EXPIRES + 1, resource_type="Patient")


@pytest.mark.parametrize("resource_type", ["Observation", "Patient", "DiagnosticReport"])
def test_star_scope_covers_every_type(resource_type: str) -> None:
    _authorize(_record(scope=[ALL_TYPES]), resource_type=resource_type)


def test_record_to_json() -> None:
    record = _record(revoked_height=7)
    assert record.to_json() == {
        "consent": GRANT_HASH.hex(),
        "patient": PATIENT.fingerprint,
        "grantee": "beta",
        "scope": ["Observation", "Condition"],
        "purpose": "TREAT",
        "time_ms": T0,
        "starts_ms": T0,
        "expires_ms": EXPIRES,
        "height": 4,
        "revoked_height": 7,
    }
    assert _record().to_json()["revoked_height"] is None
    assert _record(starts_ms=T0 + 50).to_json()["starts_ms"] == T0 + 50


# ---------------------------------------------------------------------------
# The consent's period: it starts at starts_ms (or the grant's time)
# ---------------------------------------------------------------------------


def test_a_consent_starting_later_is_refused_until_its_start() -> None:
    start = T0 + 1000
    record = _record(starts_ms=start)
    assert record.grant.starts_ms == start and record.grant.time_ms == T0
    for now in (T0, T0 + 1, start - 1):
        with pytest.raises(ConsentDenied, match="period has not started yet"):
            _authorize(record, now_ms=now)
    _authorize(record, now_ms=start)  # from its first millisecond
    _authorize(record, now_ms=EXPIRES - 1)


def test_a_grant_dated_in_the_future_is_refused_until_its_own_time() -> None:
    """Without starts_ms the period starts at the grant's time_ms (the Consent shows that)."""
    record = _record(time_ms=T0 + 500)
    with pytest.raises(ConsentDenied, match="period has not started yet"):
        _authorize(record, now_ms=T0 + 499)
    _authorize(record, now_ms=T0 + 500)


def test_a_start_before_the_grant_is_allowed() -> None:
    """A patient may sign today a consent whose period began earlier (it cannot act earlier)."""
    record = _record(time_ms=T0 + 500, starts_ms=T0)
    _authorize(record, now_ms=T0 + 1)


def test_revocation_and_expiry_still_win_over_a_later_start() -> None:
    with pytest.raises(ConsentDenied, match="revoked"):
        _authorize(_record(revoked_height=3, starts_ms=T0 + 9), now_ms=T0)
    with pytest.raises(ConsentDenied, match="expired"):
        _authorize(_record(starts_ms=T0 + 9), now_ms=EXPIRES)


@pytest.mark.parametrize(
    "starts",
    [EXPIRES, EXPIRES + 1, -1, True, "0", None],
    ids=["at-expiry", "after-expiry", "negative", "bool", "string", "null"],
)
def test_a_bad_start_is_refused(starts: Any) -> None:
    body = {**_grant_body(), "starts_ms": starts}
    with pytest.raises(InvalidInput, match="starts_ms must be a time before expires_ms"):
        ConsentGrant.from_tx(_signed(CONSENT_GRANT, body))


def test_grant_tx_with_a_start_signs_it() -> None:
    tx = _grant(starts_ms=T0 + 7)
    assert tx.body["starts_ms"] == T0 + 7
    with pytest.raises(InvalidSignature):
        ConsentGrant.from_tx(replace(tx, body={**tx.body, "starts_ms": T0}))
    with pytest.raises(InvalidInput, match="starts_ms"):
        _grant(starts_ms=EXPIRES)


def test_an_unknown_extra_field_is_still_refused() -> None:
    body = {**_grant_body(), "ends_ms": EXPIRES}
    with pytest.raises(InvalidInput, match="optionally starts_ms"):
        ConsentGrant.from_tx(_signed(CONSENT_GRANT, body))


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

_TYPES = st.from_regex(r"[A-Z][A-Za-z]{1,20}", fullmatch=True)
_MEMBERS = st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True)


@st.composite
def _grant_args(draw: st.DrawFn) -> dict[str, Any]:
    time_ms = draw(st.integers(min_value=0, max_value=2**52))
    star = draw(st.booleans())
    scope = [ALL_TYPES] if star else draw(st.lists(_TYPES, min_size=1, max_size=8, unique=True))
    return {
        "chain": CHAIN,
        "grantee": draw(_MEMBERS),
        "scope": scope,
        "purpose": draw(st.sampled_from(sorted(PURPOSES))),
        "expires_ms": time_ms + draw(st.integers(min_value=1, max_value=2**40)),
        "time_ms": time_ms,
    }


@settings(max_examples=60, deadline=None)
@given(args=_grant_args())
def test_any_well_formed_grant_round_trips(args: dict[str, Any]) -> None:
    tx = grant_tx(PATIENT, **args)
    grant = ConsentGrant.from_tx(Transaction.decode(tx.encode()))
    assert grant.grantee == args["grantee"] and grant.scope == tuple(args["scope"])
    assert (grant.expires_ms, grant.time_ms) == (args["expires_ms"], args["time_ms"])


_SIGNED = _grant()


@st.composite
def _mutations(draw: st.DrawFn) -> Transaction:
    """The signed grant with one signed field changed to another *well-formed* value."""
    body = copy.deepcopy(_SIGNED.body)
    time_ms = _SIGNED.time_ms
    field = draw(
        st.sampled_from(["time_ms", "grantee", "scope", "purpose", "expires_ms", "patient"])
    )
    if field == "time_ms":
        time_ms = draw(st.integers(min_value=0, max_value=EXPIRES - 1).filter(lambda t: t != T0))
    elif field == "grantee":
        body["grantee"] = draw(_MEMBERS.filter(lambda g: g != "beta"))
    elif field == "scope":
        body["scope"] = draw(
            st.lists(_TYPES, min_size=1, max_size=6, unique=True).filter(
                lambda s: s != body["scope"]
            )
            | st.just([ALL_TYPES])
        )
    elif field == "purpose":
        body["purpose"] = draw(st.sampled_from(sorted(set(PURPOSES) - {"TREAT"})))
    elif field == "expires_ms":
        body["expires_ms"] = draw(
            st.integers(min_value=T0 + 1, max_value=2**53 - 1).filter(lambda e: e != EXPIRES)
        )
    else:  # the patient and key swapped for another patient's, consistently
        body.update(patient=OTHER.fingerprint, patient_key=OTHER.public.der().hex())
    return Transaction(
        type=CONSENT_GRANT,
        chain=CHAIN,
        body=body,
        time_ms=time_ms,
        signatures=_SIGNED.signatures,
    )


@settings(max_examples=80, deadline=None)
@given(tx=_mutations())
def test_any_change_to_a_signed_grant_fails_verification(tx: Transaction) -> None:
    assert tx.signing_bytes() != _SIGNED.signing_bytes()
    with pytest.raises(InvalidSignature):
        ConsentGrant.from_tx(tx)
    # The same content signed afresh by its patient is a valid grant: only the signature failed.
    key = OTHER if tx.body["patient"] == OTHER.fingerprint else PATIENT
    ConsentGrant.from_tx(replace(tx, signatures=(key.sign(tx.signing_bytes()),)))


@settings(max_examples=60, deadline=None)
@given(
    field=st.sampled_from(["patient", "patient_key", "grantee", "scope", "purpose", "expires_ms"]),
    value=st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.text(max_size=8),
        st.lists(st.integers(), max_size=2),
    ),
)
def test_arbitrary_field_values_never_crash_or_pass_unsigned(field: str, value: Any) -> None:
    """Any value in a signed field either leaves a valid grant or raises a MedledgerError."""
    body = copy.deepcopy(_SIGNED.body)
    body[field] = value
    tx = replace(_SIGNED, body=body)
    if body == _SIGNED.body:
        ConsentGrant.from_tx(tx)
        return
    with pytest.raises(MedledgerError):
        ConsentGrant.from_tx(tx)


@pytest.mark.parametrize("purpose", [["TREAT"], {"TREAT": 1}], ids=["list", "dict"])
def test_unhashable_purpose_is_refused_as_invalid_input(purpose: Any) -> None:
    body = _grant_body()
    body["purpose"] = purpose
    with pytest.raises(InvalidInput, match="purpose must be one of"):
        ConsentGrant.from_tx(_signed(CONSENT_GRANT, body))
