"""PATCH entries in transaction and batch Bundles, through a real records service."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from medledger.core.errors import MedledgerError, NotFound, PreconditionFailed
from medledger.node import Node, init_node, open_node
from medledger.services.fhir import FhirInvalid
from medledger.storage.keystore import KdfParams

T = TypeVar("T")
PW = b"bundle patch passphrase"
MRN = "urn:oid:1.2.3"


def run(root: Path, fn: Callable[[Node], Awaitable[T]]) -> T:
    async def go() -> T:
        node = open_node(root, PW)
        try:
            return await fn(node)
        finally:
            await node.close()

    return asyncio.run(go())


def patch_entry(url: str, ops: Any, **request: Any) -> dict[str, Any]:
    data = base64.b64encode(json.dumps(ops).encode()).decode()
    return {
        "resource": {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": data},
        "request": {"method": "PATCH", "url": url, **request},
    }  # fmt: skip


def transaction(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


PATIENT = {
    "resourceType": "Patient",
    "id": "p1",
    "gender": "male",
    "birthDate": "1970-01-01",
    "identifier": [{"system": MRN, "value": "M1"}],
}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    node_root = tmp_path / "node"
    init_node(node_root, name="Bundle Patch", passphrase=PW, kdf=KdfParams(n=2**12))

    async def fill(node: Node) -> None:
        await node.records.update("Patient", "p1", PATIENT)

    run(node_root, fill)
    return node_root


def test_a_patch_entry_updates_the_current_version_with_the_rest(root: Path) -> None:
    observation = {
        "resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"},
        "subject": {"reference": "Patient/p1"},
    }  # fmt: skip

    async def go(node: Node) -> tuple[dict[str, Any], dict[str, Any], int]:
        answer = await node.records.transaction(
            transaction(
                patch_entry(
                    "Patient/p1", [{"op": "replace", "path": "/gender", "value": "female"}]
                ),
                {"resource": observation, "request": {"method": "PUT", "url": "Observation/o1"}},
            )
        )
        patient = await node.records.read("Patient", "p1")
        return answer, patient.resource(), patient.version

    answer, patient, version = run(root, go)
    assert [e["response"]["status"] for e in answer["entry"]] == ["200 OK", "201 Created"]
    assert version == 2 and patient["gender"] == "female"
    assert patient["birthDate"] == PATIENT["birthDate"]  # the rest of the current version kept


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        # ifMatch of an older version: the whole transaction is refused.
        (patch_entry("Patient/p1", [{"op": "remove", "path": "/birthDate"}], ifMatch='W/"0"'),
         PreconditionFailed),
        # A failing test operation.
        (patch_entry("Patient/p1", [{"op": "test", "path": "/gender", "value": "female"}]),
         PreconditionFailed),
        # A patch that changes what the resource is, one that is not base64 JSON, no Binary.
        (patch_entry("Patient/p1", [{"op": "replace", "path": "/id", "value": "p2"}]), FhirInvalid),
        ({**patch_entry("Patient/p1", []), "resource": {"resourceType": "Binary",
          "contentType": "application/json-patch+json", "data": "not base64!"}}, FhirInvalid),
        ({**patch_entry("Patient/p1", []), "resource": {"resourceType": "Patient"}}, FhirInvalid),
        (patch_entry("Patient/nobody", []), NotFound),
        (patch_entry(f"Patient?identifier={MRN}|nobody", []), NotFound),
    ],
)  # fmt: skip
def test_a_refused_patch_entry_writes_nothing(
    root: Path, entry: dict[str, Any], error: type[MedledgerError]
) -> None:
    other = {"resourceType": "Patient", "id": "p2", "gender": "other"}

    async def go(node: Node) -> tuple[int, bool]:
        with pytest.raises(error):
            await node.records.transaction(
                transaction(
                    {"resource": other, "request": {"method": "PUT", "url": "Patient/p2"}}, entry
                )
            )
        current = await node.records.read("Patient", "p1")
        try:
            await node.records.read("Patient", "p2")
        except NotFound:
            return current.version, False
        return current.version, True

    assert run(root, go) == (1, False)


def test_conditional_patch_and_batch(root: Path) -> None:
    def outcome(exc: MedledgerError) -> tuple[int, dict[str, Any]]:
        return (412 if isinstance(exc, PreconditionFailed) else 400), {"error": type(exc).__name__}

    async def go(node: Node) -> tuple[dict[str, Any], dict[str, Any]]:
        answer = await node.records.batch(
            {"resourceType": "Bundle", "type": "batch", "entry": [
                patch_entry(f"Patient?identifier={MRN}|M1", [{"op": "add", "path": "/active", "value": True}]),
                patch_entry("Patient/p1", [{"op": "test", "path": "/active", "value": False}]),
            ]},
            outcome,
        )  # fmt: skip
        return answer, (await node.records.read("Patient", "p1")).resource()

    answer, patient = run(root, go)
    assert [e["response"]["status"] for e in answer["entry"]] == ["200 OK", "412"]
    assert patient["active"] is True and patient["gender"] == "male"
