"""Consent and access rules of :class:`medledger.ledger.consortium.rules.ConsortiumState`.

The state machine is driven directly (``check`` then ``apply``), as every
member and auditor drives it over the final order.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from medledger.core.consent import ConsentRecord, grant_tx, revoke_tx
from medledger.core.consortium import Genesis, Member
from medledger.core.errors import ConsentDenied, InvalidInput, InvalidSignature
from medledger.core.keys import SigningKey
from medledger.core.models import Transaction
from medledger.core.transactions import ACCESS_BATCH
from medledger.ledger.consortium.modes import initial_state
from medledger.ledger.consortium.rules import MAX_ACCESS_BATCH, ConsortiumState

T0 = 1_700_000_000_000
DAY = 86_400_000
KEYS = [SigningKey.generate() for _ in range(4)]
IDS = ["alpha", "beta", "gamma", "delta"]
GENESIS = Genesis(
    consortium="demo",
    time_ms=T0,
    members=tuple(
        Member(id=i, name=i.title(), signing_key=k.public) for i, k in zip(IDS, KEYS, strict=True)
    ),
)
CHAIN = GENESIS.chain_id
PATIENT = SigningKey.generate()
OTHER_PATIENT = SigningKey.generate()
OUTSIDER = SigningKey.generate()


def _state() -> ConsortiumState:
    state = initial_state(GENESIS)
    assert type(state) is ConsortiumState
    return state


def _grant(patient: SigningKey = PATIENT, **overrides: Any) -> Transaction:
    args: dict[str, Any] = {
        "chain": CHAIN,
        "grantee": "beta",
        "scope": ["Observation"],
        "purpose": "TREAT",
        "expires_ms": T0 + DAY,
        "time_ms": T0,
    }
    args.update(overrides)
    return grant_tx(patient, **args)


def _revoke(
    grant: Transaction, patient: SigningKey = PATIENT, time_ms: int = T0 + 1
) -> Transaction:
    return revoke_tx(patient, chain=CHAIN, grant=grant.hash(), time_ms=time_ms)


def _accept(state: ConsortiumState, tx: Transaction, height: int) -> bytes:
    state.check(tx)
    tx_hash = tx.hash()
    state.apply(tx, tx_hash, height)
    return tx_hash


def _sign(tx: Transaction, *keys: SigningKey) -> Transaction:
    return replace(tx, signatures=tuple(k.sign(tx.signing_bytes()) for k in keys))


# ---------------------------------------------------------------------------
# consent.grant
# ---------------------------------------------------------------------------


def test_grant_is_checked_and_recorded_with_its_height() -> None:
    state = _state()
    tx = _grant()
    tx_hash = _accept(state, tx, height=3)
    record = state.consents[tx_hash]
    assert record.tx_hash == tx_hash and record.height == 3 and record.revoked_height is None
    assert record.grant.patient == PATIENT.fingerprint and record.grant.grantee == "beta"
    assert record.grant.scope == ("Observation",) and record.grant.time_ms == T0
    assert tx_hash in state.seen
    assert state.consents_of(PATIENT.fingerprint) == [record]
    assert state.consents_of(OTHER_PATIENT.fingerprint) == []
    record.authorize(
        reader="beta", patient=PATIENT.fingerprint, resource_type="Observation", now_ms=T0 + 5
    )


@pytest.mark.parametrize("grantee", IDS)
def test_any_current_member_can_be_grantee(grantee: str) -> None:
    _state().check(_grant(grantee=grantee))


def test_grantee_must_be_a_member() -> None:
    with pytest.raises(InvalidInput, match="grantee 'omega' is not a member"):
        _state().check(_grant(grantee="omega"))


def test_grantee_removed_from_the_consortium_is_refused() -> None:
    state = _state()
    removal = Transaction(type="member.remove", chain=CHAIN, body={"id": "delta"}, time_ms=T0)
    _accept(state, _sign(removal, *KEYS[:3]), height=1)
    assert state.members.by_id("delta") is None
    with pytest.raises(InvalidInput, match="not a member"):
        state.check(_grant(grantee="delta"))
    state.check(_grant(grantee="gamma"))


def test_grant_with_a_bad_signature_is_refused_unless_signatures_are_skipped() -> None:
    tx = _grant()
    altered = replace(tx, body={**tx.body, "grantee": "gamma"})
    state = _state()
    with pytest.raises(InvalidSignature):
        state.check(altered)
    # The early, unsigned pre-check skips verification (the ordered check is authoritative)...
    state.check(altered, verify_signatures=False)
    # ...and does not leave verification off for the next check.
    with pytest.raises(InvalidSignature):
        state.check(altered)


def test_grant_signed_by_a_member_instead_of_the_patient_is_refused() -> None:
    tx = _sign(_grant(), KEYS[1])
    with pytest.raises(InvalidSignature, match="the patient's"):
        _state().check(tx)


def test_malformed_grant_is_refused() -> None:
    tx = _grant()
    bad = Transaction(type=tx.type, chain=CHAIN, body={**tx.body, "scope": []}, time_ms=tx.time_ms)
    with pytest.raises(InvalidInput, match="scope"):
        _state().check(_sign(bad, PATIENT))


def test_grant_on_another_chain_is_refused() -> None:
    with pytest.raises(InvalidInput, match="names chain 'consortium:other'"):
        _state().check(_grant(chain="consortium:other"))


def test_grant_replay_is_refused() -> None:
    state = _state()
    tx = _grant()
    _accept(state, tx, height=1)
    with pytest.raises(InvalidInput, match="replay"):
        state.check(tx)


def test_consents_of_lists_oldest_first_and_only_that_patients() -> None:
    state = _state()
    late = _accept(state, _grant(time_ms=T0 + 10), height=5)
    early = _accept(state, _grant(time_ms=T0 + 20), height=2)
    same_height_later = _accept(state, _grant(time_ms=T0 + 40), height=5)
    same_height_earlier = _accept(state, _grant(time_ms=T0 + 30), height=5)
    other = _accept(state, _grant(OTHER_PATIENT), height=1)
    mine = [r.tx_hash for r in state.consents_of(PATIENT.fingerprint)]
    assert mine == [early, late, same_height_earlier, same_height_later]
    assert [r.tx_hash for r in state.consents_of(OTHER_PATIENT.fingerprint)] == [other]
    assert len(state.consents) == 5


# ---------------------------------------------------------------------------
# consent.revoke
# ---------------------------------------------------------------------------


def test_revoke_marks_the_grant_revoked_at_its_height() -> None:
    state = _state()
    grant = _grant()
    grant_hash = _accept(state, grant, height=2)
    before = state.consents[grant_hash]
    revoke = _revoke(grant)
    revoke_hash = _accept(state, revoke, height=7)
    after = state.consents[grant_hash]
    assert after == replace(before, revoked_height=7)
    assert revoke_hash in state.seen and revoke_hash not in state.consents
    assert state.consents_of(PATIENT.fingerprint) == [after]  # revoked ones are still listed
    with pytest.raises(ConsentDenied, match="revoked"):
        after.authorize(
            reader="beta", patient=PATIENT.fingerprint, resource_type="Observation", now_ms=T0 + 1
        )


def test_revoke_of_an_unknown_grant_is_refused() -> None:
    with pytest.raises(InvalidInput, match="names no consent grant of this patient"):
        _state().check(_revoke(_grant()))


def test_revoke_of_a_grant_checked_but_not_yet_applied_is_refused() -> None:
    state = _state()
    grant = _grant()
    state.check(grant)
    with pytest.raises(InvalidInput, match="names no consent grant"):
        state.check(_revoke(grant))


def test_revocation_by_another_patient_is_refused() -> None:
    state = _state()
    grant = _grant()
    grant_hash = _accept(state, grant, height=1)
    with pytest.raises(InvalidInput, match="names no consent grant of this patient"):
        state.check(_revoke(grant, patient=OTHER_PATIENT))
    assert state.consents[grant_hash].revoked_height is None


def test_revoke_naming_our_patient_but_signed_by_another_key_is_refused() -> None:
    state = _state()
    grant = _grant()
    _accept(state, grant, height=1)
    forged = _sign(_revoke(grant), OTHER_PATIENT)
    with pytest.raises(InvalidSignature, match="the patient's"):
        state.check(forged)
    altered = replace(_revoke(grant), time_ms=T0 + 99)
    with pytest.raises(InvalidSignature, match="does not verify"):
        state.check(altered)


def test_double_revoke_is_refused() -> None:
    state = _state()
    grant = _grant()
    _accept(state, grant, height=1)
    first = _revoke(grant, time_ms=T0 + 1)
    _accept(state, first, height=2)
    with pytest.raises(InvalidInput, match="replay"):
        state.check(first)
    with pytest.raises(InvalidInput, match="already revoked"):
        state.check(_revoke(grant, time_ms=T0 + 2))


def test_revoking_one_grant_leaves_the_others() -> None:
    state = _state()
    first, second = _grant(time_ms=T0), _grant(time_ms=T0 + 1)
    first_hash = _accept(state, first, height=1)
    second_hash = _accept(state, second, height=1)
    _accept(state, _revoke(first), height=2)
    assert state.consents[first_hash].revoked_height == 2
    assert state.consents[second_hash].revoked_height is None


def test_revoke_of_an_expired_grant_is_still_accepted() -> None:
    """No clock decides validity: the rules never look at expiry."""
    state = _state()
    grant = _grant(expires_ms=T0 + 1)
    grant_hash = _accept(state, grant, height=1)
    _accept(state, _revoke(grant, time_ms=T0 + DAY), height=2)
    assert state.consents[grant_hash].revoked_height == 2


# ---------------------------------------------------------------------------
# copy()
# ---------------------------------------------------------------------------


def test_copy_is_independent_for_consents() -> None:
    state = _state()
    grant = _grant()
    grant_hash = _accept(state, grant, height=1)
    snapshot = state.copy()
    assert snapshot.consents == state.consents and snapshot.consents is not state.consents

    # A revocation applied to the copy leaves the original's record unrevoked...
    _accept(snapshot, _revoke(grant), height=2)
    assert snapshot.consents[grant_hash].revoked_height == 2
    assert state.consents[grant_hash].revoked_height is None
    # ...and a grant applied to the copy is not in the original.
    extra = _grant(OTHER_PATIENT)
    extra_hash = _accept(snapshot, extra, height=2)
    assert extra_hash in snapshot.consents and extra_hash not in state.consents
    assert state.consents_of(OTHER_PATIENT.fingerprint) == []

    # The other way round: the original's changes do not reach the copy.
    later = _grant(time_ms=T0 + 5)
    later_hash = _accept(state, later, height=3)
    assert later_hash not in snapshot.consents


def test_copy_of_an_empty_state_is_independent() -> None:
    state = _state()
    snapshot = state.copy()
    _accept(snapshot, _grant(), height=1)
    assert state.consents == {}
    assert state.consents_of(PATIENT.fingerprint) == []


def test_copies_share_the_seen_set_by_design() -> None:
    """The order is never rolled back, so a tx accepted in a copy is a replay everywhere."""
    state = _state()
    snapshot = state.copy()
    tx = _grant()
    _accept(snapshot, tx, height=1)
    with pytest.raises(InvalidInput, match="replay"):
        state.check(tx)


def test_apply_default_height_is_zero() -> None:
    state = _state()
    tx = _grant()
    state.check(tx)
    state.apply(tx, tx.hash())
    record = state.consents[tx.hash()]
    assert isinstance(record, ConsentRecord) and record.height == 0


# ---------------------------------------------------------------------------
# access
# ---------------------------------------------------------------------------


def _access(holder: str = "alpha", **changes: Any) -> Transaction:
    body: dict[str, Any] = {
        "reader": "beta",
        "holder": holder,
        "patient": PATIENT.fingerprint,
        "consent": "ab" * 32,
        "resource": "Observation/abc",
        "outcome": "allowed",
    }
    body.update(changes)
    return Transaction(type="access", chain=CHAIN, body=body, time_ms=T0)


@pytest.mark.parametrize("outcome", ["allowed", "refused"])
def test_access_signed_by_the_holder_is_accepted(outcome: str) -> None:
    state = _state()
    tx = _sign(_access(outcome=outcome), KEYS[0])
    tx_hash = _accept(state, tx, height=4)
    assert tx_hash in state.seen and state.consents == {}


def test_access_signed_by_the_reader_instead_of_the_holder_is_refused() -> None:
    with pytest.raises(InvalidSignature, match="access held by 'alpha' signed by 'beta'"):
        _state().check(_sign(_access(), KEYS[1]))


def test_access_by_a_non_member_is_refused() -> None:
    with pytest.raises(InvalidSignature, match="not a current member"):
        _state().check(_sign(_access(), OUTSIDER))
    with pytest.raises(InvalidSignature, match="not a current member"):
        _state().check(_sign(_access(holder="omega"), OUTSIDER))


def test_access_with_two_signatures_is_refused() -> None:
    with pytest.raises(InvalidSignature, match="exactly one signature"):
        _state().check(_sign(_access(), KEYS[0], KEYS[1]))


def test_access_unsigned_or_altered_is_refused() -> None:
    with pytest.raises(InvalidSignature, match="must be signed"):
        _state().check(_access())
    signed = _sign(_access(), KEYS[0])
    altered = replace(signed, body={**signed.body, "outcome": "refused"})
    with pytest.raises(InvalidSignature, match="does not verify"):
        _state().check(altered)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"outcome": "maybe"}, "outcome must be"),
        ({"outcome": 1}, "strings"),
        ({"resource": None}, "strings"),
        ({"extra": "x"}, "must have exactly"),
    ],
)
def test_malformed_access_is_refused(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason):
        _state().check(_sign(_access(**changes), KEYS[0]))


def test_access_missing_a_field_is_refused() -> None:
    tx = _access()
    body = dict(tx.body)
    del body["consent"]
    with pytest.raises(InvalidInput, match="must have exactly"):
        _state().check(_sign(replace(tx, body=body), KEYS[0]))


def _batch(holder: str = "alpha", entries: Any = None, **extra: Any) -> Transaction:
    if entries is None:
        entries = [
            {k: v for k, v in _access(outcome=o).body.items() if k != "holder"}
            for o in ("allowed", "refused", "allowed")
        ]
    body = {"holder": holder, "entries": entries, **extra}
    return Transaction(type=ACCESS_BATCH, chain=CHAIN, body=body, time_ms=T0)


def _entry(**changes: Any) -> dict[str, Any]:
    entry = {k: v for k, v in _access().body.items() if k != "holder"}
    entry.update(changes)
    return entry


def test_access_batch_signed_by_the_holder_is_accepted() -> None:
    state = _state()
    tx = _sign(_batch(), KEYS[0])
    tx_hash = _accept(state, tx, height=2)
    assert tx_hash in state.seen
    with pytest.raises(InvalidInput, match="replay"):
        state.check(tx)


def test_access_batch_of_the_most_entries_is_accepted() -> None:
    _state().check(_sign(_batch(entries=[_entry()] * MAX_ACCESS_BATCH), KEYS[0]))


def test_access_batch_signed_by_another_member_is_refused() -> None:
    with pytest.raises(InvalidSignature, match="access held by 'alpha' signed by 'beta'"):
        _state().check(_sign(_batch(), KEYS[1]))


def test_access_batch_altered_after_signing_is_refused() -> None:
    signed = _sign(_batch(), KEYS[0])
    entries = [dict(e) for e in signed.body["entries"]]
    entries[1]["outcome"] = "allowed"
    with pytest.raises(InvalidSignature, match="does not verify"):
        _state().check(replace(signed, body={**signed.body, "entries": entries}))


@pytest.mark.parametrize(
    ("batch", "reason"),
    [
        (_batch(entries=[]), "1 to 128 entries"),
        (_batch(entries=[_entry()] * (MAX_ACCESS_BATCH + 1)), "1 to 128 entries"),
        (_batch(entries={"a": 1}), "holder and entries"),
        (_batch(extra="x"), "holder and entries"),
        (_batch(entries=[_entry(outcome="maybe")]), "outcome must be"),
        (_batch(entries=[_entry(resource=None)]), "strings"),
        (_batch(entries=[_entry(holder="alpha")]), "each access.batch entry"),
        (_batch(entries=[_entry(), "Observation/abc"]), "each access.batch entry"),
        (_batch(entries=[{k: v for k, v in _entry().items() if k != "consent"}]), "exactly"),
    ],
)
def test_malformed_access_batch_is_refused(batch: Transaction, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason):
        _state().check(_sign(batch, KEYS[0]))


def test_unknown_type_is_refused() -> None:
    tx = Transaction(type="consent.amend", chain=CHAIN, body={}, time_ms=T0)
    with pytest.raises(InvalidInput, match="unknown consortium transaction type"):
        _state().check(_sign(tx, PATIENT))


def _rebind(signer: SigningKey = KEYS[0], **changes: Any) -> Transaction:
    body = {
        "institution": "alpha",
        "patient": PATIENT.fingerprint,
        "previous": OTHER_PATIENT.fingerprint,
        "actor": "admin:0a1b2c3d4e5f",
    } | changes
    tx = Transaction(type="patient.rebind", chain=CHAIN, body=body, time_ms=T0)
    return replace(tx, signatures=(signer.sign(tx.signing_bytes()),))


def test_a_break_glass_report_is_signed_by_its_institution_and_names_keys_only() -> None:
    state = _state()
    ok = _rebind()
    state.check(ok)
    state.apply(ok, ok.hash())
    with pytest.raises(InvalidInput, match="replay"):
        state.check(ok)
    refusals: list[tuple[Transaction, type[Exception], str]] = [
        (_rebind(KEYS[1]), InvalidSignature, "signed by 'beta'"),
        (_rebind(OUTSIDER), InvalidSignature, "not a current member"),
        (_rebind(actor="clinician:0a1b"), InvalidInput, "admin"),
        (_rebind(actor="admin:Jane Doe, MRN 12345"), InvalidInput, "admin"),
        (_rebind(previous=PATIENT.fingerprint), InvalidInput, "different key"),
        (_rebind(patient="not a fingerprint"), InvalidInput, "hex"),
        (_rebind(reason="lost wallet"), InvalidInput, "exactly"),
    ]
    for tx, error, reason in refusals:
        with pytest.raises(error, match=reason):
            state.check(tx)
