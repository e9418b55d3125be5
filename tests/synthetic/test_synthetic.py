"""The synthetic-patient generator: deterministic, valid FHIR R4, referentially closed."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from medledger.core.errors import InvalidInput
from medledger.synthetic import (
    CVX,
    LOINC,
    MRN_SYSTEM,
    RXNORM,
    SNOMED,
    UCUM,
    PatientBundle,
    all_resource_types,
    generate_patient,
    generate_patients,
    iter_patients,
)

#: Twenty patients spread over the first thousand.
SAMPLE = range(0, 1000, 50)


def dump(bundles: list[PatientBundle]) -> bytes:
    return json.dumps(
        [[b.index, b.patient, b.resources] for b in bundles], sort_keys=True, allow_nan=False
    ).encode()


def walk(value: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair in a JSON tree, depth first."""
    yield key, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from walk(v, k)
    elif isinstance(value, list):
        for item in value:
            yield from walk(item, key)


@pytest.fixture(scope="module")
def sample() -> list[PatientBundle]:
    return [generate_patient(i) for i in SAMPLE]


# --- determinism -----------------------------------------------------------------------


def test_same_arguments_give_byte_identical_output() -> None:
    assert dump(generate_patients(5, seed=7)) == dump(generate_patients(5, seed=7))


def test_patient_k_does_not_depend_on_count_or_start_index() -> None:
    whole = generate_patients(12, seed=3)
    assert dump(generate_patients(4, seed=3, start_index=8)) == dump(whole[8:])
    assert dump([generate_patient(9, seed=3)]) == dump([whole[9]])
    assert [b.index for b in whole] == list(range(12))


def test_iterator_and_list_agree() -> None:
    assert dump(list(iter_patients(6, seed=2, start_index=40))) == dump(
        generate_patients(6, seed=2, start_index=40)
    )


def test_output_is_identical_in_another_process_with_another_hash_seed() -> None:
    code = (
        "import hashlib, json\n"
        "from medledger.synthetic import generate_patients\n"
        "bs = generate_patients(3, seed=11, start_index=5, resources_per_patient=60)\n"
        "data = json.dumps([[b.patient, b.resources] for b in bs], sort_keys=True)\n"
        "print(hashlib.sha256(data.encode()).hexdigest())\n"
    )
    here = generate_patients(3, seed=11, start_index=5, resources_per_patient=60)
    expected = hashlib.sha256(
        json.dumps([[b.patient, b.resources] for b in here], sort_keys=True).encode()
    ).hexdigest()
    for hash_seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == expected


def test_different_seeds_give_different_data() -> None:
    a, b = generate_patient(0, seed=0), generate_patient(0, seed=1)
    assert a.patient != b.patient
    assert a.patient_id != b.patient_id
    ids_a = {r["id"] for r in generate_patients(20, seed=0)[5].all_resources()}
    ids_b = {r["id"] for r in generate_patients(20, seed=1)[5].all_resources()}
    assert not ids_a & ids_b
    names = {
        json.dumps(generate_patient(i, seed=s).patient["name"]) for s in range(5) for i in range(5)
    }
    assert len(names) > 15


def test_fresh_objects_on_every_call_and_no_shared_containers() -> None:
    bundle = generate_patient(4, resources_per_patient=80)
    containers = [
        id(v) for r in bundle.all_resources() for _, v in walk(r) if isinstance(v, dict | list)
    ]
    assert len(containers) == len(set(containers)), "a dict or list is shared between places"
    before = dump([bundle])
    bundle.resources[0]["code"]["coding"][0]["code"] = "mutated"
    bundle.patient["name"][0]["family"] = "Mutated"
    assert dump([generate_patient(4, resources_per_patient=80)]) == before


# --- volume ----------------------------------------------------------------------------


@pytest.mark.parametrize("per_patient", [0, 1, 7, 100, 333])
def test_resource_count_is_exactly_resources_per_patient(per_patient: int) -> None:
    bundles = generate_patients(5, seed=9, resources_per_patient=per_patient)
    assert [len(b.resources) for b in bundles] == [per_patient] * 5
    assert all(b.patient["resourceType"] == "Patient" for b in bundles)


def test_smaller_volume_is_a_prefix_of_larger_volume() -> None:
    small = generate_patient(17, seed=5, resources_per_patient=30)
    large = generate_patient(17, seed=5, resources_per_patient=250)
    assert small.patient == large.patient
    assert small.resources == large.resources[:30]


def test_thousand_patients_make_about_a_hundred_thousand_resources() -> None:
    total = sum(len(b.resources) + 1 for b in iter_patients(1000))
    assert 100_000 <= total <= 101_000


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(InvalidInput):
        generate_patients(-1)
    with pytest.raises(InvalidInput):
        generate_patients(1, start_index=-1)
    with pytest.raises(InvalidInput):
        generate_patient(0, resources_per_patient=-1)
    with pytest.raises(InvalidInput):
        generate_patient(-3)
    with pytest.raises(InvalidInput):
        iter_patients(2, resources_per_patient=-5)  # refused at the call, before any next()
    assert generate_patients(0) == []


# --- FHIR validity ---------------------------------------------------------------------


@pytest.mark.parametrize("index", SAMPLE)
def test_every_resource_validates_against_the_r4b_model(index: int) -> None:
    bundle = generate_patient(index, seed=index % 3)
    for resource in bundle.all_resources():
        model = get_fhir_model_class(resource["resourceType"])
        model.model_validate(resource)


def test_all_resource_types_are_produced(sample: list[PatientBundle]) -> None:
    types = all_resource_types()
    assert types[0] == "Patient"
    assert len(types) == len(set(types))
    produced = Counter(r["resourceType"] for b in sample for r in b.all_resources())
    assert set(produced) == set(types)


def test_ids_are_unique_fhir_ids(sample: list[PatientBundle]) -> None:
    ids = [r["id"] for b in sample for r in b.all_resources()]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", i) for i in ids)


def test_references_point_to_the_patient_or_an_earlier_resource(
    sample: list[PatientBundle],
) -> None:
    for bundle in sample:
        patient_ref = f"Patient/{bundle.patient_id}"
        seen = {patient_ref}
        for resource in bundle.resources:
            owner = (
                "patient"
                if resource["resourceType"] in {"AllergyIntolerance", "Immunization"}
                else "subject"
            )
            assert resource[owner] == {"reference": patient_ref}
            refs = [v for k, v in walk(resource) if k == "reference"]
            assert refs, resource["resourceType"]
            for ref in refs:
                assert ref in seen, f"{resource['resourceType']} refers forward or outside: {ref}"
            if "encounter" in resource:
                assert resource["encounter"]["reference"].startswith("Encounter/")
            seen.add(f"{resource['resourceType']}/{resource['id']}")


def test_diagnostic_reports_collect_lab_observations(sample: list[PatientBundle]) -> None:
    reports = 0
    for bundle in sample:
        by_ref = {f"{r['resourceType']}/{r['id']}": r for r in bundle.resources}
        for report in (r for r in bundle.resources if r["resourceType"] == "DiagnosticReport"):
            reports += 1
            results = [by_ref[x["reference"]] for x in report["result"]]
            assert results and all(r["resourceType"] == "Observation" for r in results)
            assert all(r["encounter"] == report["encounter"] for r in results)
            assert all(r["category"][0]["coding"][0]["code"] == "laboratory" for r in results)
    assert reports > 0


# --- vocabularies ----------------------------------------------------------------------

CODE_FIELD = {
    "Observation": ("code", LOINC),
    "DiagnosticReport": ("code", LOINC),
    "Condition": ("code", SNOMED),
    "Procedure": ("code", SNOMED),
    "AllergyIntolerance": ("code", SNOMED),
    "MedicationRequest": ("medicationCodeableConcept", RXNORM),
    "Immunization": ("vaccineCode", CVX),
    "Encounter": ("type", SNOMED),
}


def codes(sample: list[PatientBundle], resource_type: str) -> set[str]:
    field, system = CODE_FIELD[resource_type]
    out = set()
    for bundle in sample:
        for resource in bundle.resources:
            if resource["resourceType"] != resource_type:
                continue
            top = resource[field] if isinstance(resource[field], list) else [resource[field]]
            concepts = [*top, *resource.get("component", [])]
            for concept in concepts:
                concept = concept.get("code", concept)
                for coding in concept["coding"]:
                    assert coding["system"] == system, (resource_type, coding)
                    assert coding["display"]
                    out.add(coding["code"])
    return out


def test_clinical_codes_use_the_real_code_system_uris(sample: list[PatientBundle]) -> None:
    for resource_type in CODE_FIELD:
        assert codes(sample, resource_type), resource_type


def test_well_known_codes_appear() -> None:
    population = generate_patients(60, seed=1)
    assert {"8867-4", "8480-6", "8462-4", "29463-7", "8302-2", "2339-0", "4548-4"} <= codes(
        population, "Observation"
    )
    assert {"44054006", "38341003", "195967001"} <= codes(population, "Condition")
    assert {"860975", "314076", "745679"} <= codes(population, "MedicationRequest")
    assert {"140"} <= codes(population, "Immunization")


def test_quantities_use_ucum_and_categories_match(sample: list[PatientBundle]) -> None:
    vital_codes = {
        "8867-4",
        "85354-9",
        "29463-7",
        "8302-2",
        "39156-5",
        "9279-1",
        "8310-5",
        "2708-6",
    }
    for bundle in sample:
        for resource in bundle.resources:
            for key, value in walk(resource):
                if key == "valueQuantity":
                    assert value["system"] == UCUM and value["code"] == value["unit"]
                    assert isinstance(value["value"], int | float)
            if resource["resourceType"] == "Observation":
                category = resource["category"][0]["coding"][0]["code"]
                code = resource["code"]["coding"][0]["code"]
                assert category == ("vital-signs" if code in vital_codes else "laboratory")


def test_patient_demographics(sample: list[PatientBundle]) -> None:
    genders: Counter[str] = Counter()
    for bundle in sample:
        patient = bundle.patient
        (identifier,) = patient["identifier"]
        assert identifier["system"] == MRN_SYSTEM
        assert identifier["value"] == f"MRN{bundle.index:08d}"
        assert patient["name"][0]["family"] and patient["name"][0]["given"]
        assert patient["address"][0]["city"]
        assert re.fullmatch(r"555-01\d\d", patient["telecom"][0]["value"])
        genders[patient["gender"]] += 1
    assert genders["male"] and genders["female"]


# --- dates -----------------------------------------------------------------------------

DATE_TIME = re.compile(r"(19[3-9]\d|20[0-2]\d)-\d\d-\d\dT\d\d:\d\d:\d\dZ")
DATE_KEYS = {"authoredOn", "issued", "recordedDate", "start", "end"}


def test_dates_are_well_formed_and_between_1930_and_2025(sample: list[PatientBundle]) -> None:
    for bundle in sample:
        birth = bundle.patient["birthDate"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", birth)
        assert "1930-01-01" <= birth <= "2025-12-31"
        checked = 0
        for resource in bundle.resources:
            for key, value in walk(resource):
                if key.endswith("DateTime") or key in DATE_KEYS:
                    assert DATE_TIME.fullmatch(value), (key, value)
                    assert birth <= value[:10] <= "2025-12-31", (key, value)
                    checked += 1
        assert checked >= len(bundle.resources)


def test_encounter_resources_happen_during_the_encounter_day(sample: list[PatientBundle]) -> None:
    for bundle in sample:
        days = {
            f"Encounter/{r['id']}": r["period"]["start"][:10]
            for r in bundle.resources
            if r["resourceType"] == "Encounter"
        }
        for resource in bundle.resources:
            if "encounter" in resource:
                day = days[resource["encounter"]["reference"]]
                stamp = next(
                    v for k, v in walk(resource) if k.endswith("DateTime") or k == "authoredOn"
                )
                assert stamp[:10] == day
