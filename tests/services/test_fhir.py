"""FHIR input handling: size/depth limits, parsing, validation, OperationOutcome — and that
rejected input writes nothing at all (chain, index and blob store unchanged)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import pytest
import simplejson
from node_files import node_state

from medledger.core.errors import InvalidInput, MedledgerError
from medledger.node import Node, init_node, open_node
from medledger.services.fhir import (
    MAX_BODY_BYTES,
    MAX_DEPTH,
    FhirInvalid,
    Issue,
    dump_resource,
    load_json,
    operation_outcome,
    validate_id,
    validate_resource,
)
from medledger.storage.keystore import KdfParams

T = TypeVar("T")
PW = b"records test passphrase"

OBS_CODE = {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}


# -- helpers -------------------------------------------------------------------------


def run(root: Path, fn: Callable[[Node], Awaitable[T]]) -> T:
    async def go() -> T:
        node = open_node(root, PW)
        try:
            return await fn(node)
        finally:
            await node.close()

    return asyncio.run(go())


def first_issue(exc: pytest.ExceptionInfo[FhirInvalid]) -> Issue:
    assert exc.value.issues, "FhirInvalid without issues"
    return exc.value.issues[0]


@pytest.fixture(scope="module")
def node_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fhir") / "node"
    init_node(root, name="FHIR Test", passphrase=PW, kdf=KdfParams(n=2**12))

    async def seed(node: Node) -> None:
        await node.records.update("Patient", "p1", {"resourceType": "Patient", "gender": "male"})

    run(root, seed)
    return root


# -- load_json ------------------------------------------------------------------------


def test_load_json_keeps_decimal_text() -> None:
    value = load_json(b'{"value": 1.50, "n": 7, "x": 0.10, "big": 1E+2}')
    assert value["value"] == Decimal("1.50")
    assert str(value["value"]) == "1.50"
    assert value["n"] == 7 and isinstance(value["n"], int)
    assert dump_resource(value) == b'{"value":1.50,"n":7,"x":0.10,"big":1E+2}'


def test_load_json_accepts_str_and_unicode() -> None:
    assert load_json('{"family": "Müller"}') == {"family": "Müller"}
    assert load_json('{"family": "Müller"}'.encode()) == {"family": "Müller"}
    assert dump_resource({"family": "Müller"}) == '{"family":"Müller"}'.encode()


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (b'{"resourceType":', "line 1, column 17"),
        (b'{"a": 1,}', "line 1"),
        (b"{\n  'a': 1\n}", "line 2, column 3"),
        (b'{"a": NaN}', "line 1, column 7"),
        (b'{"a": Infinity}', "line 1"),
        (b"", "line 1, column 1"),
        (b'{"a": 1} trailing', "line 1"),
    ],
)
def test_invalid_json_text(text: bytes, where: str) -> None:
    with pytest.raises(FhirInvalid) as exc:
        load_json(text)
    issue = first_issue(exc)
    assert issue.severity == "error"
    assert issue.code == "structure"
    assert "not valid JSON" in issue.diagnostics
    assert where in issue.diagnostics
    assert isinstance(exc.value, InvalidInput)


def test_invalid_utf8() -> None:
    with pytest.raises(FhirInvalid) as exc:
        load_json(b'{"a": "\xff\xfe"}')
    issue = first_issue(exc)
    assert issue.code == "structure"
    assert "UTF-8" in issue.diagnostics and "byte 7" in issue.diagnostics


def test_50mb_body_is_refused_by_size_without_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    original = simplejson.loads

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(simplejson, "loads", spy)
    body = b'{"a":"' + b"x" * (50 * 1024 * 1024) + b'"}'
    start = time.perf_counter()
    with pytest.raises(FhirInvalid) as exc:
        load_json(body)
    elapsed = time.perf_counter() - start
    issue = first_issue(exc)
    assert issue.code == "too-costly"
    assert str(len(body)) in issue.diagnostics
    assert str(MAX_BODY_BYTES) in issue.diagnostics
    assert calls == []
    assert elapsed < 1.0
    with pytest.raises(FhirInvalid, match="limit"):
        load_json(body.decode())
    assert calls == []


def test_size_limit_is_inclusive() -> None:
    assert load_json(b'{"a":1}   ', max_bytes=10) == {"a": 1}
    with pytest.raises(FhirInvalid, match="11 bytes; the limit is 10"):
        load_json(b'{"a":1}    ', max_bytes=10)
    # Multi-byte characters count as bytes, not characters.
    with pytest.raises(FhirInvalid, match="limit"):
        load_json('"ééééé"', max_bytes=10)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 10_000,
        "[" * 10_000 + "]" * 10_000,
        '{"a":' * 10_000 + "1" + "}" * 10_000,
        "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1),
        '{"a":' * (MAX_DEPTH + 1) + "{}" + "}" * (MAX_DEPTH + 1),
    ],
    ids=["10k-open", "10k-balanced", "10k-objects", "limit+1-lists", "limit+1-objects"],
)
def test_deep_nesting_is_refused(text: str) -> None:
    start = time.perf_counter()
    with pytest.raises(FhirInvalid) as exc:
        load_json(text)
    assert time.perf_counter() - start < 2.0
    issue = first_issue(exc)
    assert issue.code == "structure"
    assert f"deeper than {MAX_DEPTH}" in issue.diagnostics


def test_nesting_at_the_limit_is_accepted() -> None:
    value = load_json("[" * MAX_DEPTH + "]" * MAX_DEPTH)
    depth = 0
    while isinstance(value, list):
        depth += 1
        value = value[0] if value else None
    assert depth == MAX_DEPTH


# -- validate_resource ------------------------------------------------------------------


def test_valid_resource_returned_unchanged() -> None:
    resource = {"resourceType": "Patient", "id": "p-1.x", "birthDate": "1970-01-02"}
    assert validate_resource(resource) is resource
    assert resource == {"resourceType": "Patient", "id": "p-1.x", "birthDate": "1970-01-02"}


@pytest.mark.parametrize(
    ("resource", "expression"),
    [
        ({"resourceType": "Patient", "birthDate": 5}, "Patient.birthDate"),
        ({"resourceType": "Patient", "birthDate": 0}, "Patient.birthDate"),
        ({"resourceType": "Patient", "birthDate": True}, "Patient.birthDate"),
        ({"resourceType": "Patient", "birthDate": "1970-13-01"}, "Patient.birthDate"),
        ({"resourceType": "Patient", "active": "yes"}, "Patient.active"),
        ({"resourceType": "Patient", "active": 1}, "Patient.active"),
        ({"resourceType": "Patient", "multipleBirthInteger": "3"}, "Patient.multipleBirthInteger"),
        ({"resourceType": "Patient", "name": [{"family": 5}]}, "Patient.name[0].family"),
        ({"resourceType": "Patient", "name": {"family": "X"}}, "Patient.name"),
        ({"resourceType": "Patient", "name": [{"given": "Ann"}]}, "Patient.name[0].given"),
        ({"resourceType": "Patient", "meta": {"versionId": 5}}, "Patient.meta.versionId"),
        (
            {
                "resourceType": "Observation",
                "status": "final",
                "code": OBS_CODE,
                "valueQuantity": {"value": "1.5"},
            },
            "Observation.valueQuantity.value",
        ),
        (
            {
                "resourceType": "Observation",
                "status": "final",
                "code": OBS_CODE,
                "subject": {"reference": 5},
            },
            "Observation.subject.reference",
        ),
    ],
    ids=[
        "birthDate-5",
        "birthDate-0",
        "birthDate-true",
        "birthDate-month13",
        "active-str",
        "active-int",
        "multipleBirthInteger-str",
        "family-int",
        "name-object",
        "given-str",
        "versionId-int",
        "decimal-str",
        "reference-int",
    ],
)
def test_wrong_types_are_refused(resource: dict[str, Any], expression: str) -> None:
    """JSON values of the wrong JSON type are invalid FHIR (FHIR JSON §2.6.2), never coerced."""
    with pytest.raises(FhirInvalid) as exc:
        validate_resource(resource)
    issue = first_issue(exc)
    assert issue.severity == "error"
    assert issue.expression[0] == expression


@pytest.mark.parametrize("rtype", ["Foo", "Resource", "DomainResource", "patient", "Patient2", ""])
def test_unknown_resource_type(rtype: str) -> None:
    with pytest.raises(FhirInvalid) as exc:
        validate_resource({"resourceType": rtype})
    issue = first_issue(exc)
    assert issue.expression == ("resourceType",)
    assert issue.code == "not-supported"
    assert repr(rtype) in issue.diagnostics


@pytest.mark.parametrize("rtype", ["Foo", "Patient2"])
def test_bundle_entry_of_unknown_type(rtype: str) -> None:
    """An unknown type inside a Bundle is reported like one at the top level (not a KeyError)."""
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": {"resourceType": "Patient"}}, {"resource": {"resourceType": rtype}}],
    }
    with pytest.raises(FhirInvalid) as exc:
        validate_resource(bundle)
    assert first_issue(exc).expression[0].startswith("Bundle.entry[1].resource")


@pytest.mark.parametrize("value", [{}, {"resourceType": 5}, {"resourceType": None}])
def test_missing_resource_type(value: dict[str, Any]) -> None:
    with pytest.raises(FhirInvalid) as exc:
        validate_resource(value)
    issue = first_issue(exc)
    assert issue.expression == ("resourceType",)
    assert issue.code == "required"


@pytest.mark.parametrize("value", [[], "Patient", 5, None])
def test_not_an_object(value: object) -> None:
    with pytest.raises(FhirInvalid, match="JSON object"):
        validate_resource(value)


def test_expected_type_mismatch() -> None:
    with pytest.raises(FhirInvalid) as exc:
        validate_resource({"resourceType": "Patient"}, expected_type="Observation")
    assert first_issue(exc).expression == ("resourceType",)


def test_missing_required_field() -> None:
    with pytest.raises(FhirInvalid) as exc:
        validate_resource({"resourceType": "Observation", "status": "final"})
    issue = first_issue(exc)
    assert issue.code == "required"
    assert issue.expression == ("Observation.code",)
    assert str(exc.value) == "Field required at Observation.code"


def test_unknown_field_and_several_issues() -> None:
    with pytest.raises(FhirInvalid) as exc:
        validate_resource({"resourceType": "Patient", "foo": 1, "bar": 2})
    expressions = {i.expression[0] for i in exc.value.issues}
    assert expressions == {"Patient.foo", "Patient.bar"}
    assert "(+1 more)" in str(exc.value)


@pytest.mark.parametrize("rid", ["a b", "a/b", "", "x" * 65, "ü", "a_b", "a:b", "../x"])
def test_invalid_ids(rid: str) -> None:
    with pytest.raises(FhirInvalid) as exc:
        validate_id(rid)
    assert first_issue(exc).expression == ("id",)
    with pytest.raises(FhirInvalid) as exc2:
        validate_resource({"resourceType": "Patient", "id": rid})
    assert first_issue(exc2).expression == ("Patient.id",)


@pytest.mark.parametrize("rid", ["a", "A-1.b", "x" * 64, "0"])
def test_valid_ids(rid: str) -> None:
    assert validate_id(rid) == rid


def test_non_string_id() -> None:
    with pytest.raises(FhirInvalid):
        validate_id(5)
    with pytest.raises(FhirInvalid) as exc:
        validate_resource({"resourceType": "Patient", "id": 5})
    assert first_issue(exc).expression == ("Patient.id",)


def test_operation_outcome_shape() -> None:
    with pytest.raises(FhirInvalid) as exc:
        validate_resource({"resourceType": "Observation", "status": "final", "foo": 1})
    outcome = operation_outcome(exc.value.issues)
    assert outcome["resourceType"] == "OperationOutcome"
    assert len(outcome["issue"]) == 2
    for issue in outcome["issue"]:
        assert set(issue) == {"severity", "code", "diagnostics", "expression"}
        assert issue["severity"] == "error"
        assert isinstance(issue["diagnostics"], str) and issue["diagnostics"]
        assert isinstance(issue["expression"], list)
    by_expr = {i["expression"][0]: i for i in outcome["issue"]}
    assert by_expr["Observation.code"]["code"] == "required"
    assert by_expr["Observation.foo"]["code"] == "invalid"
    # The OperationOutcome is itself a valid FHIR resource.
    validate_resource(outcome)
    bare = operation_outcome([Issue(severity="warning", code="x", diagnostics="d")])
    assert bare == {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "warning", "code": "x", "diagnostics": "d"}],
    }


# -- nothing is written for rejected input ---------------------------------------------------

BAD_WRITES: list[tuple[str, Callable[[Node], Awaitable[Any]], str]] = [
    (
        "create-wrong-type",
        lambda n: n.records.create({"resourceType": "Patient", "birthDate": 5}),
        "Patient.birthDate",
    ),
    (
        "create-coerced-type",
        lambda n: n.records.create({"resourceType": "Patient", "active": "yes"}),
        "Patient.active",
    ),
    (
        "create-unknown-type",
        lambda n: n.records.create({"resourceType": "Foo"}),
        "resourceType",
    ),
    (
        "create-missing-code",
        lambda n: n.records.create({"resourceType": "Observation", "status": "final"}),
        "Observation.code",
    ),
    (
        "update-bad-id",
        lambda n: n.records.update("Patient", "a/b", {"resourceType": "Patient"}),
        "Patient.id",
    ),
    (
        "update-body-bad-id",
        lambda n: n.records.update("Patient", "ok", {"resourceType": "Patient", "id": "a b"}),
        "Patient.id",
    ),
    (
        "update-type-mismatch",
        lambda n: n.records.update(
            "Patient", "p1", {"resourceType": "Observation", "status": "final", "code": OBS_CODE}
        ),
        "resourceType",
    ),
    (
        "update-id-mismatch",
        lambda n: n.records.update("Patient", "p1", {"resourceType": "Patient", "id": "p2"}),
        "Patient.id",
    ),
    (
        "update-extra-field",
        lambda n: n.records.update("Patient", "p1", {"resourceType": "Patient", "x": 1}),
        "Patient.x",
    ),
    (
        "transaction-bad-entry",
        lambda n: n.records.transaction(
            {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {
                        "resource": {"resourceType": "Patient"},
                        "request": {"method": "POST", "url": "Patient"},
                    },
                    {
                        "resource": {"resourceType": "Observation", "status": "final"},
                        "request": {"method": "POST", "url": "Observation"},
                    },
                ],
            }
        ),
        "Bundle.entry[1].resource.code",
    ),
]


@pytest.mark.parametrize(
    ("write", "expression"),
    [(w, e) for _, w, e in BAD_WRITES],
    ids=[name for name, _, _ in BAD_WRITES],
)
def test_rejected_writes_write_nothing(
    node_root: Path, write: Callable[[Node], Awaitable[Any]], expression: str
) -> None:
    before = node_state(node_root)

    async def attempt(node: Node) -> None:
        with pytest.raises(FhirInvalid) as exc:
            await write(node)
        assert first_issue(exc).expression[0] == expression
        # The existing record is untouched and still readable.
        stored = await node.records.read("Patient", "p1")
        assert stored.version == 1

    run(node_root, attempt)
    assert node_state(node_root) == before


@pytest.mark.parametrize("body", [[1, 2, 3], "Patient", 5, None], ids=repr)
def test_non_object_bodies_are_fhir_invalid(node_root: Path, body: Any) -> None:
    """What ``load_json`` returns for any JSON text must be refused cleanly by the service."""
    before = node_state(node_root)

    async def attempt(node: Node) -> None:
        with pytest.raises(FhirInvalid, match="JSON object"):
            await node.records.create(body)
        with pytest.raises(FhirInvalid, match="JSON object"):
            await node.records.update("Patient", "p1", body)

    run(node_root, attempt)
    assert node_state(node_root) == before


def test_non_transaction_bundle_writes_nothing(node_root: Path) -> None:
    before = node_state(node_root)

    async def attempt(node: Node) -> None:
        with pytest.raises(InvalidInput):
            await node.records.transaction({"resourceType": "Bundle", "type": "batch"})
        with pytest.raises(MedledgerError):
            await node.records.transaction(
                {
                    "resourceType": "Bundle",
                    "type": "transaction",
                    "entry": [{"request": {"method": "GET", "url": "Patient/p1"}}],
                }
            )

    run(node_root, attempt)
    assert node_state(node_root) == before


# -- required value-set bindings ----------------------------------------------------------

_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"


@pytest.mark.parametrize(
    ("resource", "expression"),
    [
        ({"resourceType": "Patient", "gender": "robot"}, "Patient.gender"),
        ({"resourceType": "Practitioner", "gender": "M"}, "Practitioner.gender"),
        (
            {"resourceType": "Observation", "status": "bogus", "code": OBS_CODE},
            "Observation.status",
        ),
        # A list the models cut short ("registered | … | amended +"): completed from R4.
        (
            {"resourceType": "Encounter", "status": "done", "class": {"code": "AMB"}},
            "Encounter.status",
        ),
        (
            {
                "resourceType": "MedicationRequest",
                "status": "active",
                "intent": "wish",
                "subject": {"reference": "Patient/p"},
                "medicationCodeableConcept": {"text": "x"},
            },
            "MedicationRequest.intent",
        ),
        ({"resourceType": "Patient", "name": [{"use": "nick"}]}, "Patient.name[0].use"),
        (
            {
                "resourceType": "Condition",
                "subject": {"reference": "Patient/p"},
                "clinicalStatus": {"coding": [{"system": _CLINICAL, "code": "better"}]},
            },
            "Condition.clinicalStatus",
        ),
        (
            # Required binding: text alone, or another system only, is not a code of it.
            {
                "resourceType": "Condition",
                "subject": {"reference": "Patient/p"},
                "clinicalStatus": {"text": "active"},
            },
            "Condition.clinicalStatus",
        ),
        (
            {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"resource": {"resourceType": "Patient", "gender": "robot"}}],
            },
            "Bundle.entry[0].resource.gender",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_codes_outside_a_required_value_set_are_refused(
    resource: dict[str, Any], expression: str
) -> None:
    with pytest.raises(FhirInvalid) as exc:
        validate_resource(resource)
    issue = first_issue(exc)
    assert issue.code == "code-invalid"
    assert issue.expression == (expression,)
    # The refused code is not echoed back (an OperationOutcome may end up in a log).
    assert "robot" not in issue.diagnostics and "bogus" not in issue.diagnostics


@pytest.mark.parametrize(
    "resource",
    [
        {"resourceType": "Patient", "gender": "unknown"},
        # Codes past the models' cut-short lists are valid R4 codes.
        {"resourceType": "Observation", "status": "entered-in-error", "code": OBS_CODE},
        {"resourceType": "Observation", "status": "corrected", "code": OBS_CODE},
        {"resourceType": "Encounter", "status": "entered-in-error", "class": {"code": "AMB"}},
        {
            "resourceType": "Condition",
            "subject": {"reference": "Patient/p"},
            "clinicalStatus": {
                "coding": [
                    {"system": "http://example.org/local", "code": "whatever"},
                    {"system": _CLINICAL, "code": "remission"},
                ]
            },
        },
    ],
)
def test_codes_inside_a_required_value_set_are_accepted(resource: dict[str, Any]) -> None:
    assert validate_resource(resource) == resource


def test_required_codes_refused_in_a_write_write_nothing(node_root: Path) -> None:
    before = node_state(node_root)

    async def go(node: Node) -> None:
        with pytest.raises(FhirInvalid):
            await node.records.create({"resourceType": "Patient", "gender": "robot"})
        with pytest.raises(FhirInvalid):
            await node.records.update(
                "Observation",
                "o1",
                {"resourceType": "Observation", "status": "bogus", "code": OBS_CODE},
            )

    run(node_root, go)
    assert node_state(node_root) == before


@pytest.mark.parametrize("rtype", ["EffectEvidenceSynthesis", "MedicinalProduct"])
def test_r4_types_the_r4b_models_lack_are_named_as_such(rtype: str) -> None:
    with pytest.raises(FhirInvalid) as exc:
        validate_resource({"resourceType": rtype})
    issue = first_issue(exc)
    assert issue.code == "not-supported"
    assert "R4B" in issue.diagnostics and rtype in issue.diagnostics


_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
_ALLERGY_CLINICAL = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"


def _concept(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


@pytest.mark.parametrize(
    ("resource", "key"),
    [
        (
            {
                "resourceType": "Condition",
                "subject": {"reference": "Patient/p"},
                "clinicalStatus": _concept(_CLINICAL, "active"),
                "abatementDateTime": "2020-01-01",
            },
            "con-4",
        ),
        (
            {
                "resourceType": "Condition",
                "subject": {"reference": "Patient/p"},
                "clinicalStatus": _concept(_CLINICAL, "active"),
                "verificationStatus": _concept(_VERIFICATION, "entered-in-error"),
            },
            "con-5",
        ),
        ({"resourceType": "AllergyIntolerance", "patient": {"reference": "Patient/p"}}, "ait-2"),
        (
            {
                "resourceType": "Observation",
                "status": "final",
                "code": OBS_CODE,
                "valueString": "x",
                "dataAbsentReason": {"text": "not asked"},
            },
            "obs-6",
        ),
        ({"resourceType": "Patient", "contact": [{"gender": "male"}]}, "pat-1"),
    ],
)
def test_core_invariants_the_models_miss_are_refused(resource: dict[str, Any], key: str) -> None:
    with pytest.raises(FhirInvalid) as exc:
        validate_resource(resource)
    issue = first_issue(exc)
    assert issue.code == "invariant" and issue.diagnostics.startswith(f"{key}:")


def test_resources_keeping_the_invariants_are_accepted() -> None:
    resolved = {
        "resourceType": "Condition",
        "subject": {"reference": "Patient/p"},
        "clinicalStatus": _concept(_CLINICAL, "resolved"),
        "abatementDateTime": "2020-01-01",
    }
    allergy = {
        "resourceType": "AllergyIntolerance",
        "patient": {"reference": "Patient/p"},
        "clinicalStatus": _concept(_ALLERGY_CLINICAL, "active"),
    }
    contact = {"resourceType": "Patient", "contact": [{"name": {"family": "Roe"}}]}
    for resource in (resolved, allergy, contact):
        assert validate_resource(resource) == resource
