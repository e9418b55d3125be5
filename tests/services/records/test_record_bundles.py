"""``services.records.bundles``: a transaction Bundle planned as typed write intents.

Pure planning, nothing stored: which entries are creates and which updates,
the ids they get, and the transaction-local references rewritten to them.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from medledger.core.errors import InvalidInput
from medledger.services.fhir import FhirInvalid
from medledger.services.records.bundles import plan_transaction
from medledger.services.records.model import WriteIntent

PATIENT_URL = "urn:uuid:4f1c2c1e-0000-4000-8000-000000000001"


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
            "request": {"method": "PUT", "url": "Patient/p2"},
        },
        {
            "resource": _observation(PATIENT_URL),
            "request": {"method": "POST", "url": "Observation"},
        },
    )
    created, updated, observation = plan_transaction(bundle)
    assert isinstance(created, WriteIntent) and created.create
    assert uuid.UUID(created.id).version == 4
    assert (updated.resource_type, updated.id, updated.create, updated.if_match) == (
        "Patient",
        "p2",
        False,
        None,
    )
    assert observation.create and observation.id not in (created.id, "p2")
    # The Observation now points at the id the Patient was given, not the urn.
    assert observation.resource["subject"] == {"reference": f"Patient/{created.id}"}
    # The submitted Bundle is not changed.
    assert bundle["entry"][2]["resource"]["subject"] == {"reference": PATIENT_URL}


def test_the_resource_is_kept_out_of_a_write_intents_repr() -> None:
    intent = WriteIntent(resource_type="Patient", id="p1", resource={"name": [{"family": "Doe"}]})
    assert "Doe" not in repr(intent)


@pytest.mark.parametrize(
    ("entry", "expression"),
    [
        ({"request": {"method": "POST", "url": "Patient"}}, "Bundle.entry[0]"),
        (
            {
                "resource": {"resourceType": "Patient"},
                "request": {"method": "DELETE", "url": "Patient/p1"},
            },
            "Bundle.entry[0]",
        ),
        (
            {"resource": {"resourceType": "Patient"}, "request": {"method": "PUT", "url": "x"}},
            "Bundle.entry[0].request.url",
        ),
        (
            {
                "resource": {"resourceType": "Patient"},
                "request": {"method": "PUT", "url": "Observation/o1"},
            },
            "Bundle.entry[0].request.url",
        ),
    ],
)
def test_an_entry_that_is_no_post_or_put_of_its_own_type_is_refused(
    entry: dict[str, Any], expression: str
) -> None:
    with pytest.raises(FhirInvalid) as caught:
        plan_transaction(_bundle(entry))
    assert [i.expression for i in caught.value.issues] == [(expression,)]


def test_only_a_transaction_bundle_is_planned() -> None:
    with pytest.raises(InvalidInput, match="type 'transaction'"):
        plan_transaction({"resourceType": "Bundle", "type": "batch", "entry": []})
