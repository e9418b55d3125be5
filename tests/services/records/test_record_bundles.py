"""``services.records.bundles``: a Bundle planned as typed write intents.

What reaches the writer, with nothing stored: which entries are creates,
updates and deletes, the ids they get, and the references rewritten to them
(transaction-local ``urn:uuid`` ones and conditional ``Type?criteria`` ones).
The writer and the blind-index search are stand-ins of this test's own
making that record what they are asked.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from medledger.core.errors import InvalidInput, PreconditionFailed
from medledger.services.conditional import ConditionalWrites
from medledger.services.fhir import FhirInvalid
from medledger.services.records.bundles import BundleContext, apply_transaction
from medledger.services.records.model import StoredResource, WriteIntent
from medledger.services.validation import Validator

PATIENT_URL = "urn:uuid:4f1c2c1e-0000-4000-8000-000000000001"


class _Recorder:
    """The writer and the search: what a Bundle asks of the records service."""

    def __init__(self, matches: dict[str, list[str]] | None = None) -> None:
        self.intents: list[WriteIntent] = []
        self.matches = matches or {}

    async def write_many(self, intents: Sequence[WriteIntent]) -> list[StoredResource]:
        self.intents.extend(intents)
        return [
            StoredResource(
                resource_type=i.resource_type,
                id=i.id,
                version=1,
                last_updated="2026-01-01T00:00:00.000Z",
                data=b"{}",
                tx_hash=b"\0" * 32,
            )
            for i in intents
        ]

    async def read(self, rtype: str, rid: str) -> StoredResource:
        return (await self.write_many([WriteIntent(resource_type=rtype, id=rid, resource={})]))[0]

    async def search_ids(self, rtype: str, params: Mapping[str, Sequence[str]]) -> list[str]:
        key = f"{rtype}?" + "&".join(f"{k}={v}" for k, vs in params.items() for v in vs)
        return self.matches.get(key, [])


def _apply(bundle: dict[str, Any], recorder: _Recorder) -> dict[str, Any]:
    ctx = BundleContext(
        validator=Validator(),
        write_many=recorder.write_many,
        read=recorder.read,
        conditional=ConditionalWrites(recorder),
    )
    return asyncio.run(apply_transaction(bundle, ctx))


def _bundle(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def _observation(subject: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "heart rate"},
        "subject": {"reference": subject},
    }


def test_posts_get_new_ids_puts_keep_theirs_and_local_references_follow() -> None:
    bundle = _bundle(
        {
            "fullUrl": PATIENT_URL,
            "resource": {"resourceType": "Patient", "gender": "female"},
            "request": {"method": "POST", "url": "Patient"},
        },
        {
            "resource": {"resourceType": "Patient", "id": "p2", "gender": "male"},
            "request": {"method": "PUT", "url": "Patient/p2", "ifMatch": 'W/"4"'},
        },
        {
            "resource": _observation(PATIENT_URL),
            "request": {"method": "POST", "url": "Observation"},
        },
        {"request": {"method": "DELETE", "url": "Observation/o9"}},
    )
    recorder = _Recorder()
    _apply(bundle, recorder)
    created, updated, observation, deleted = recorder.intents
    assert created.create and uuid.UUID(created.id).version == 4
    assert (updated.resource_type, updated.id, updated.create, updated.if_match) == (
        "Patient",
        "p2",
        False,
        4,
    )
    assert observation.create and observation.id not in (created.id, "p2")
    # The Observation now points at the id the Patient was given, not the urn.
    assert observation.resource["subject"] == {"reference": f"Patient/{created.id}"}
    assert (deleted.delete, deleted.id) == (True, "o9")
    # The submitted Bundle is not changed.
    assert bundle["entry"][2]["resource"]["subject"] == {"reference": PATIENT_URL}


def test_conditional_references_and_entries_follow_the_search() -> None:
    recorder = _Recorder({"Patient?identifier=s|1": ["p1"], "Patient?identifier=s|2": ["p2", "p3"]})
    bundle = _bundle(
        {
            "resource": _observation("Patient?identifier=s|1"),
            "request": {"method": "POST", "url": "Observation"},
        },
        {
            "resource": {"resourceType": "Patient", "gender": "male"},
            "request": {"method": "PUT", "url": "Patient?identifier=s|1"},
        },
        {
            "resource": {"resourceType": "Patient"},
            "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=s|9"},
        },
    )
    answer = _apply(bundle, recorder)
    observation, updated, created = recorder.intents
    assert observation.resource["subject"] == {"reference": "Patient/p1"}
    assert (updated.id, updated.resource["id"], updated.create) == ("p1", "p1", False)
    assert created.create
    assert [e["response"]["status"] for e in answer["entry"]] == ["201 Created"] * 3
    # Several matches, for a reference or an entry: the whole Bundle is refused.
    for entry in (
        {
            "resource": _observation("Patient?identifier=s|2"),
            "request": {"method": "POST", "url": "Observation"},
        },
        {"request": {"method": "DELETE", "url": "Patient?identifier=s|2"}},
    ):
        refused = _Recorder(recorder.matches)
        with pytest.raises(PreconditionFailed):
            _apply(_bundle(entry), refused)
        assert refused.intents == []


def test_the_resource_is_kept_out_of_a_write_intents_repr() -> None:
    intent = WriteIntent(resource_type="Patient", id="p1", resource={"name": [{"family": "Doe"}]})
    assert "Doe" not in repr(intent)


@pytest.mark.parametrize(
    ("entry", "expression"),
    [
        ({"request": {"method": "POST", "url": "Patient"}}, "Bundle.entry[0].resource"),
        (
            {"resource": {"resourceType": "Patient"}, "request": {"method": "HEAD", "url": "x"}},
            "Bundle.entry[0].request",
        ),
        (
            {"resource": {"resourceType": "Patient"}, "request": {"method": "PUT", "url": "x"}},
            "Bundle.entry[0].request.url",
        ),
        (
            {
                "resource": {"resourceType": "Patient", "id": "o1"},
                "request": {"method": "PUT", "url": "Observation/o1"},
            },
            "Bundle.entry[0].resource.resourceType",
        ),
        (
            {
                "resource": {"resourceType": "Patient", "id": "p2"},
                "request": {"method": "PUT", "url": "Patient/p1"},
            },
            "Bundle.entry[0].resource.id",
        ),
        (
            {
                "resource": {"resourceType": "Patient"},
                "request": {"method": "PUT", "url": "Patient?"},
            },
            "Bundle.entry[0].request.url",
        ),
    ],
)
def test_an_entry_that_cannot_be_planned_is_refused_and_nothing_written(
    entry: dict[str, Any], expression: str
) -> None:
    recorder = _Recorder()
    with pytest.raises(FhirInvalid) as caught:
        _apply(_bundle(entry), recorder)
    assert [i.expression for i in caught.value.issues] == [(expression,)]
    assert recorder.intents == []


def test_only_a_transaction_bundle_is_applied_as_one() -> None:
    with pytest.raises(InvalidInput, match="type 'transaction'"):
        _apply({"resourceType": "Bundle", "type": "batch", "entry": []}, _Recorder())
