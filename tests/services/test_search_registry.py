"""The search-parameter registry from HL7's Bundle, and the compiled FHIRPath subset it uses."""

from __future__ import annotations

import hashlib
import json
from datetime import date
from pathlib import Path
from typing import Any

import pytest

import medledger
from medledger.core.errors import InvalidInput
from medledger.services.fhirpath_subset import (
    UnsupportedExpression,
    compile_expression,
    reference_type,
    top_level_names,
)
from medledger.services.search import plan_query, resource_terms
from medledger.services.search_registry import SERVED_TYPES, registry

DATA = Path(medledger.__file__).parent / "data" / "fhir-r4"
#: SHA-256 of the files as HL7 publishes them (FHIR R4 4.0.1): shipped unchanged.
PUBLISHED = {
    "search-parameters.json": "46a08c8ed81f837e8a869cccaeb466be79e4d01bf973ebca53c2ec4c64f1fab8",
    "compartment.json": "8e3c9663d5f0c9f0ff8e02630d804c13a31df21a0f852fbd0a79c502122fe963",
}


def _definitions() -> list[dict[str, Any]]:
    with (DATA / "search-parameters.json").open() as f:
        return [e["resource"] for e in json.load(f)["entry"]]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_the_hl7_definitions_ship_unchanged(name: str) -> None:
    assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == PUBLISHED[name]


def test_every_standard_parameter_of_every_type_is_in_the_registry() -> None:
    reg = registry()
    definitions = _definitions()
    types = {b for d in definitions for b in d["base"]} - {"Resource", "DomainResource"}
    assert set(reg.by_type) == types
    assert len(types) > 120
    missing = []
    for d in definitions:
        if d["type"] not in SERVED_TYPES or not d.get("expression") or d["type"] == "composite":
            continue
        bases = types if "Resource" in d["base"] else set(d["base"])
        for rtype in bases:
            param = reg.get(rtype, d["code"])
            if param is None:
                missing.append((rtype, d["code"]))
            else:
                assert (param.type, param.url) == (d["type"], d["url"])
    # A shared expression may lack a branch for one of its bases; HL7's R4 has two.
    assert len(missing) <= 2, missing
    assert reg.get("Patient", "_text") is None  # no expression: not served
    assert reg.get("Observation", "code-value-string") is None  # token+string: not served
    assert reg.get("MolecularSequence", "chromosome-variant-coordinate") is None  # 3 parts
    served = reg.get("Observation", "component-code-value-quantity")
    assert served is not None and [k for k, _ in served.components] == ["token", "quantity"]


#: A representative value of each parameter type, valid for any parameter of it.
SAMPLE = {
    "string": "abc",
    "token": "http://example.org|x",
    "reference": "Patient/1",
    "date": "ge2020-01",
    "number": "5",
    "quantity": "5|http://unitsofmeasure.org|mg",
    "uri": "http://example.org/x",
}


def test_every_registered_parameter_can_be_searched() -> None:
    """What the registry (and so the CapabilityStatement) declares, a search accepts."""
    reg = registry()
    count = 0
    for rtype, params in reg.by_type.items():
        for code, param in params.items():
            tokens = lambda p, t: f"{p}|{t}".encode()  # noqa: E731
            sample = SAMPLE.get(param.type, "")
            if param.type == "composite":  # a token, then a value of the second component
                sample = f"http://loinc.org|x${SAMPLE[param.components[1][0]]}"
                sample = sample.replace("5|http://unitsofmeasure.org|mg", "gt5")
            plan_query(rtype, {code: [sample]}, tokens, today=date(2026, 1, 1))
            plan_query(rtype, {f"{code}:missing": ["true"]}, tokens, today=date(2026, 1, 1))
            count += 1
    assert count > 2000


def test_unknown_parameters_and_modifiers_are_refused() -> None:
    tokens = lambda p, t: t.encode()  # noqa: E731
    for params in (
        {"shoesize": ["9"]},
        {"gender:contains": ["x"]},
        {"code:below": ["x"]},
        {"gender:in": ["http://example.org/ValueSet/unknown"]},
        {"subject:Organization.name": ["x"]},
    ):
        with pytest.raises(InvalidInput):
            plan_query("Patient", params, tokens, today=date(2026, 1, 1))


# -- the compiled FHIRPath subset -------------------------------------------------------

OBS: dict[str, Any] = {
    "resourceType": "Observation",
    "id": "o",
    "subject": {"reference": "Patient/p"},
    "performer": [
        {"reference": "Practitioner/d"},
        {"reference": "https://other.example/fhir/Organization/o"},
    ],
    "effectivePeriod": {"start": "2020-01-01"},
    "valueQuantity": {"value": 5.0, "unit": "mg"},
    "component": [
        {"code": {"text": "a"}, "valueCodeableConcept": {"text": "first"}},
        {"code": {"text": "b"}, "valueString": "second"},
    ],
}


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("Observation.subject", [{"reference": "Patient/p"}]),
        ("Observation.effective", [{"start": "2020-01-01"}]),
        ("(Observation.effective as dateTime)", []),
        ("Observation.effective.as(Period).start", ["2020-01-01"]),
        ("(Observation.value as Quantity)", [{"value": 5.0, "unit": "mg"}]),
        ("(Observation.component.value as CodeableConcept).text", ["first"]),
        ("Observation.component.value as string", ["second"]),
        (
            "Observation.performer.where(resolve() is Practitioner)",
            [{"reference": "Practitioner/d"}],
        ),
        (
            "Observation.performer.where(resolve() is Organization)",
            [{"reference": "https://other.example/fhir/Organization/o"}],
        ),
        ("Observation.component[1].code.text", ["b"]),
        ("Observation.component.where(valueString='second').code.text", ["b"]),
        ("Patient.name | Observation.subject", [{"reference": "Patient/p"}]),
        ("Resource.id", ["o"]),
        ("Observation.focus", []),
    ],
)
def test_compiled_paths(expression: str, expected: list[Any]) -> None:
    paths = compile_expression(expression)
    path = paths.get("Observation", paths.get("Resource"))
    assert path is not None
    assert [v for v, _ in path.evaluate(OBS)] == expected
    # The fast path (skipping absent top-level elements) selects the same.
    assert [v for v, _ in path.evaluate(OBS, top_level_names(OBS))] == expected


def test_a_boolean_expression_gives_its_result() -> None:
    (path,) = compile_expression("Patient.deceased.exists() and Patient.deceased != false").values()
    for patient, result in (
        ({}, False),
        ({"deceasedBoolean": False}, False),
        ({"deceasedBoolean": True}, True),
        ({"deceasedDateTime": "2020-01-01"}, True),
    ):
        resource = {"resourceType": "Patient", **patient}
        assert [v for v, _ in path.evaluate(resource, top_level_names(resource))] == [result]
    terms = resource_terms({"resourceType": "Patient", "id": "p", "deceasedDateTime": "2020"})
    assert ("deceased", "true") in terms
    assert ("deceased", "2020") not in terms


@pytest.mark.parametrize(
    "expression",
    ["Observation.code.memberOf('http://x')", "Observation.value.first()", "Observation.code = 1"],
)
def test_fhirpath_outside_the_subset_is_refused(expression: str) -> None:
    with pytest.raises(UnsupportedExpression):
        compile_expression(expression)


def test_reference_type() -> None:
    assert reference_type("Patient/1") == "Patient"
    assert reference_type("http://h/fhir/Patient/1/_history/2") == "Patient"
    assert reference_type("#contained") is None
    assert reference_type("urn:uuid:1234") is None
    assert reference_type(None) is None
