"""Enrollment bindings on a real node: made only by signed chain txs, rebuilt from the chain.

Also the FHIR side of the reserved patient-key identifier: no write, update
or transaction Bundle can set, change or remove it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from medledger.core.consent import PATIENT_KEY_SYSTEM
from medledger.core.enrollment import PATIENT_ENROLL, enrollment_message
from medledger.core.errors import Conflict, IntegrityError, InvalidSignature, NotFound
from medledger.core.keys import SigningKey
from medledger.node import Node, init_node, open_node
from medledger.services.fhir import FhirInvalid
from medledger.services.patients import PatientWallet
from medledger.services.trail import patient_trail
from medledger.storage.keystore import KdfParams

T = TypeVar("T")
PW = b"enrollment test passphrase"
KEY_IDENTIFIER = {"system": PATIENT_KEY_SYSTEM, "value": "ab" * 32}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    init_node(tmp_path / "node", name="Alpha", passphrase=PW, kdf=KdfParams(n=2**12))
    return tmp_path / "node"


def run(root: Path, fn: Callable[[Node], Awaitable[T]]) -> T:
    async def go() -> T:
        node = open_node(root, PW)
        try:
            return await fn(node)
        finally:
            await node.close()

    return asyncio.run(go())


async def new_patient(node: Node, rid: str) -> str:
    await node.records.update("Patient", rid, {"resourceType": "Patient", "gender": "female"})
    return rid


def wallet(tmp: Path, name: str) -> PatientWallet:
    return PatientWallet.create(tmp / f"{name}.wallet", b"a wallet passphrase")


async def enroll(node: Node, rid: str, w: PatientWallet) -> str:
    pseudonym = node.records.patient_pseudonym(rid)
    return await node.enrollments.enroll(
        rid, w.public, w.enrollment_signature(node.config.institution, pseudonym)
    )


def test_bindings_are_unique_and_survive_a_restart(root: Path, tmp_path: Path) -> None:
    alice_key, bob_key, clinician_key = (wallet(tmp_path, n) for n in ("a", "b", "c"))

    async def bind(node: Node) -> None:
        alice, bob = await new_patient(node, "alice"), await new_patient(node, "bob")
        assert await enroll(node, alice, alice_key) == alice_key.fingerprint
        assert await enroll(node, alice, alice_key) == alice_key.fingerprint  # no-op
        # ... but only with the key's signature: the public key alone proves nothing.
        forged = SigningKey.generate().sign(b"anything")
        with pytest.raises(InvalidSignature):
            await node.enrollments.enroll(alice, alice_key.public, forged)
        height = node.chain.head.height
        # Finding 2: a clinician re-enrolls Alice to a key the clinician holds.
        with pytest.raises(Conflict, match="already enrolled"):
            await enroll(node, alice, clinician_key)
        # Finding 1: Alice's fingerprint onto Bob.
        with pytest.raises(Conflict, match="another patient"):
            await enroll(node, bob, alice_key)
        # A signature over another Patient's statement enrolls nothing.
        stolen = alice_key.enrollment_signature("alpha", node.records.patient_pseudonym(alice))
        with pytest.raises(InvalidSignature):
            await node.enrollments.enroll(bob, alice_key.public, stolen)
        with pytest.raises(NotFound):
            await enroll(node, "nobody", bob_key)
        assert node.chain.head.height == height  # refusals write nothing
        await enroll(node, bob, bob_key)
        assert await node.enrollments.patient_id(alice_key.fingerprint) == alice
        assert await node.enrollments.patient_id(clinician_key.fingerprint) is None

    async def reopened(node: Node) -> None:
        assert await node.enrollments.fingerprint_of("alice") == alice_key.fingerprint
        assert await node.enrollments.fingerprint_of("bob") == bob_key.fingerprint
        assert await node.enrollments.patient_id(bob_key.fingerprint) == "bob"
        with pytest.raises(Conflict):
            await enroll(node, "alice", clinician_key)

    run(root, bind)
    run(root, reopened)


def test_rotation_needs_the_bound_key_and_shows_in_both_trails(root: Path, tmp_path: Path) -> None:
    old, new, thief = (wallet(tmp_path, n) for n in ("old", "new", "thief"))

    async def story(node: Node) -> None:
        rid = await new_patient(node, "carol")
        await enroll(node, rid, old)
        pseudonym = node.records.patient_pseudonym(rid)
        statement = new.enrollment_signature("alpha", pseudonym)
        # The thief signs the hand-over instead of the bound key: refused.
        with pytest.raises(Conflict, match="bound now"):
            await node.enrollments.rotate(
                rid,
                new.public,
                statement,
                thief.public,
                thief.rotation_signature("alpha", pseudonym, new.fingerprint),
            )
        await node.enrollments.rotate(
            rid,
            new.public,
            statement,
            old.public,
            old.rotation_signature("alpha", pseudonym, new.fingerprint),
        )
        assert await node.enrollments.fingerprint_of(rid) == new.fingerprint
        assert await node.enrollments.patient_id(old.fingerprint) is None
        # Breaking glass needs a consortium to announce it on.
        with pytest.raises(NotFound, match="consortium"):
            await node.enrollments.rebind(rid, thief.public, statement, actor="admin:abc")

    run(root, story)
    from medledger.node import open_chain

    _, store = open_chain(root)
    try:
        new_trail = patient_trail([store], new.fingerprint)
        old_trail = patient_trail([store], old.fingerprint)
    finally:
        store.close()
    assert [t["event"] for t in new_trail] == ["key rotation"]
    assert [t["event"] for t in old_trail] == ["enrollment", "key rotation"]
    assert new_trail[0]["previous"] == old.fingerprint


def test_a_forged_enrollment_on_the_chain_stops_every_lookup(root: Path, tmp_path: Path) -> None:
    alice_key = wallet(tmp_path, "a")

    async def forge(node: Node) -> None:
        rid = await new_patient(node, "alice")
        pseudonym = node.records.patient_pseudonym(rid)
        # Written past the service (as a damaged or edited store would hold it).
        await node.chain.submit(
            PATIENT_ENROLL,
            {
                "patient": alice_key.fingerprint,
                "pseudonym": pseudonym,
                "patient_key": alice_key.public.der().hex(),
                "signature": SigningKey.generate()
                .sign(enrollment_message("alpha", pseudonym))
                .to_json(),
            },
        )

    async def lookup(node: Node) -> None:
        with pytest.raises(IntegrityError, match="do not verify: private chain block"):
            await node.enrollments.patient_id(alice_key.fingerprint)
        with pytest.raises(IntegrityError):
            await enroll(node, "alice", alice_key)

    run(root, forge)
    run(root, lookup)


def test_an_unsigned_enrollment_from_an_earlier_version_binds_nothing(
    root: Path, tmp_path: Path
) -> None:
    alice_key = wallet(tmp_path, "a")

    async def story(node: Node) -> None:
        rid = await new_patient(node, "alice")
        pseudonym = node.records.patient_pseudonym(rid)
        await node.chain.submit(
            PATIENT_ENROLL, {"patient": alice_key.fingerprint, "pseudonym": pseudonym}
        )
        assert await node.enrollments.patient_id(alice_key.fingerprint) is None
        assert await enroll(node, rid, alice_key) == alice_key.fingerprint

    run(root, story)


def _with_key(resource: dict[str, Any]) -> dict[str, Any]:
    return {**resource, "identifier": [KEY_IDENTIFIER]}


def test_fhir_writes_cannot_set_change_or_remove_the_patient_key(root: Path) -> None:
    patient = {"resourceType": "Patient", "gender": "male"}

    async def story(node: Node) -> None:
        records = node.records
        with pytest.raises(FhirInvalid, match="reserved"):
            await records.create(_with_key(patient))
        with pytest.raises(FhirInvalid, match="reserved"):
            await records.update("Patient", "dave", _with_key(patient))
        stored, _ = await records.update("Patient", "dave", patient)
        with pytest.raises(FhirInvalid, match="reserved"):
            await records.update("Patient", "dave", _with_key(patient))
        # Anywhere in any resource: a reference by identifier is an identifier too.
        observation = {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "weight"},
            "subject": {"reference": "Patient/dave", "identifier": KEY_IDENTIFIER},
        }
        with pytest.raises(FhirInvalid, match="reserved"):
            await records.create(observation)
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "request": {"method": "PUT", "url": "Patient/dave"},
                    "resource": {**_with_key(patient), "id": "dave"},
                }
            ],
        }
        with pytest.raises(FhirInvalid, match="reserved"):
            await records.transaction(bundle)
        assert (await records.read("Patient", "dave")).version == stored.version

    run(root, story)
