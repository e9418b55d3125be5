"""``services.patching``: JSON Patch and JSON Merge Patch applied to a resource, purely."""

from __future__ import annotations

from typing import Any

import pytest

from medledger.core.errors import PreconditionFailed
from medledger.services.fhir import FhirInvalid
from medledger.services.patching import apply_json_patch, apply_merge_patch

PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "p1",
    "gender": "male",
    "name": [{"family": "Doe", "given": ["Jane"]}],
    "address": [{"city": "Springfield"}],
}


def test_merge_patch_follows_rfc_7386() -> None:
    patched = apply_merge_patch(
        PATIENT, {"gender": "female", "address": None, "name": [{"family": "Roe"}], "active": True}
    )
    assert patched == {
        "resourceType": "Patient",
        "id": "p1",
        "gender": "female",
        "name": [{"family": "Roe"}],  # arrays are replaced, not merged
        "active": True,
    }
    assert PATIENT["gender"] == "male" and "address" in PATIENT  # the input is not changed


def test_json_patch_applies_and_leaves_the_input_alone() -> None:
    patched = apply_json_patch(
        PATIENT,
        [
            {"op": "test", "path": "/name/0/family", "value": "Doe"},
            {"op": "add", "path": "/name/0/given/-", "value": "Ann"},
            {"op": "remove", "path": "/address"},
        ],
    )
    assert patched["name"][0]["given"] == ["Jane", "Ann"] and "address" not in patched
    assert PATIENT["name"][0]["given"] == ["Jane"]


@pytest.mark.parametrize(
    "patch",
    [
        {"op": "remove", "path": "/gender"},  # not an array
        [{"op": "remove", "path": "/birthDate"}],
        [{"op": "move", "from": "/nope", "path": "/x"}],
        [{"op": "replace", "path": "/resourceType", "value": "Observation"}],
        [{"op": "replace", "path": "/id", "value": "p2"}],
        [{"op": "replace", "path": "", "value": []}],
        [{"path": "/gender"}],
        [{"op": "remove", "path": "/x"}] * 1001,
    ],
)
def test_a_json_patch_that_cannot_apply_is_refused(patch: Any) -> None:
    with pytest.raises(FhirInvalid):
        apply_json_patch(PATIENT, patch)


def test_a_failing_test_operation_is_a_precondition_and_echoes_no_value() -> None:
    with pytest.raises(PreconditionFailed) as caught:
        apply_json_patch(PATIENT, [{"op": "test", "path": "/gender", "value": "female"}])
    assert "male" not in str(caught.value)


@pytest.mark.parametrize("patch", [[{"gender": "x"}], {"id": "p2"}, {"resourceType": None}])
def test_a_merge_patch_that_changes_what_the_resource_is_is_refused(patch: Any) -> None:
    with pytest.raises(FhirInvalid):
        apply_merge_patch(PATIENT, patch)
