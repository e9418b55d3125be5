"""Search conformance: a multi-patient dataset, every parameter type and modifier, an oracle.

A seeded, bulk-export-shaped dataset of the issue's 13 types (plus
Observation for quantities) — Periods, open and closed; references between
resources, relative and absolute; identifiers with types; tags, profiles and
security labels — is written through the records service. Each search's
expected ids are computed here, from the input dicts, by plain Python that
follows the specification's wording (string "starts with", token forms, the
prefix table over day sets): none of the indexing or query code is used.
"""

from __future__ import annotations

import asyncio
import random
import unicodedata
from collections.abc import Callable, Iterator
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from medledger.node import Node, init_node, open_node
from medledger.storage.keystore import KdfParams

PW = b"conformance test passphrase"
R = dict[str, Any]
MRN = "urn:oid:1.2.36.146.595.217.0.1"
SCT = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
FAMILIES = ["Smith", "Smythe", "Okafor", "Nakamura", "Garcia", "Lindqvist", "Oakes", "Brown"]
GIVENS = ["Ada", "Adam", "Bea", "Carl", "Dina", "Emil", "Fay", "Gus"]
CITIES = ["Lund", "Lyon", "Leeds", "Oslo"]
CONDITIONS = [("44054006", "Diabetes mellitus type 2"), ("38341003", "Hypertension"),
              ("195967001", "Asthma"), ("35489007", "Depressive disorder")]  # fmt: skip
VACCINES = ["140", "208", "115"]
TAG = "http://example.org/tags"
PROFILE = "http://example.org/StructureDefinition/special-patient"
TODAY = date(2026, 12, 5)


def _plain(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).lower()


def build(seed: int = 18) -> list[R]:
    """Shared organizations, locations, practitioners and roles, then 24 patients' records."""
    rng = random.Random(seed)
    out: list[R] = []
    orgs = [f"org-{i}" for i in range(3)]
    for i, oid in enumerate(orgs):
        out.append({
            "resourceType": "Organization", "id": oid, "name": f"{CITIES[i]} General Hospital",
            "identifier": [{"system": "urn:org", "value": f"ORG{i}"}],
            "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/organization-type", "code": "prov"}]}],
        })  # fmt: skip
    locs = [f"loc-{i}" for i in range(4)]
    for i, lid in enumerate(locs):
        out.append({
            "resourceType": "Location", "id": lid, "name": f"Ward {chr(65 + i)}",
            "address": {"city": CITIES[i]}, "managingOrganization": {"reference": f"Organization/{orgs[i % 3]}"},
        })  # fmt: skip
    out.append({
        "resourceType": "Organization", "id": "org-long",
        "name": "The Northern Regional Teaching Hospital and Rehabilitation Centre of the Fjords",
    })  # fmt: skip
    pracs = [f"prac-{i}" for i in range(5)]
    for i, pid in enumerate(pracs):
        out.append({
            "resourceType": "Practitioner", "id": pid,
            "identifier": [{"system": "urn:npi", "value": f"NPI{i}"}],
            "name": [{"family": FAMILIES[i], "given": [GIVENS[i]], "prefix": ["Dr"]}],
        })  # fmt: skip
        out.append({
            "resourceType": "PractitionerRole", "id": f"role-{i}",
            "practitioner": {"reference": f"Practitioner/{pid}"},
            "organization": {"reference": f"Organization/{orgs[i % 3]}"},
            "location": [{"reference": f"Location/{locs[i % 4]}"}],
            "code": [{"coding": [{"system": SCT, "code": "158965000" if i % 2 else "309343006"}]}],
        })  # fmt: skip
    for n in range(24):
        pid = f"pat-{n}"
        family, given = rng.choice(FAMILIES), rng.choice(GIVENS)
        patient: R = {
            "resourceType": "Patient", "id": pid, "gender": rng.choice(["male", "female", "other"]),
            "identifier": [{"system": MRN, "value": f"MRN{n:03}", "type": {"coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}}],
            "name": [{"family": family, "given": [given]}],
            "address": [{"city": rng.choice(CITIES)}],
        }  # fmt: skip
        if n % 5:
            patient["birthDate"] = (
                f"{rng.randint(1940, 2010)}-{rng.randint(1, 12):02}-{rng.randint(1, 28):02}"
            )
        if n % 7 == 0:
            patient["meta"] = {"tag": [{"system": TAG, "code": "vip"}], "profile": [PROFILE],
                               "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}]}  # fmt: skip
        out.append(patient)
        # Patients are referenced relatively, and now and then by an absolute URL.
        ref = f"Patient/{pid}" if n % 6 else f"https://ehr.example.org/fhir/Patient/{pid}"
        for k in range(3):
            start = date(2019, 1, 1) + timedelta(days=rng.randint(0, 700))
            stay = rng.choice([0, 0, 1, 3, 9, 40])
            period: R = {"start": f"{start.isoformat()}T08:00:00Z"}
            if not (n % 4 == 0 and k == 2):  # some stays are still in progress
                period["end"] = f"{(start + timedelta(days=stay)).isoformat()}T17:00:00Z"
            out.append({
                "resourceType": "Encounter", "id": f"enc-{n}-{k}", "status": rng.choice(["finished", "in-progress"]),
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": rng.choice(["AMB", "IMP"])},
                "subject": {"reference": ref}, "period": period,
                "participant": [{"individual": {"reference": f"Practitioner/{rng.choice(pracs)}"}}],
                **({"location": [{"location": {"reference": f"Location/{rng.choice(locs)}"}}]} if k != 1 else {}),
                "serviceProvider": {"reference": f"Organization/{rng.choice(orgs)}"},
            })  # fmt: skip
        code, display = rng.choice(CONDITIONS)
        onset = date(2015, 1, 1) + timedelta(days=rng.randint(0, 2000))
        out.append({
            "resourceType": "Condition", "id": f"cond-{n}", "subject": {"reference": ref},
            "code": {"coding": [{"system": SCT, "code": code, "display": display}], "text": display},
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
            **({"onsetDateTime": onset.isoformat()} if n % 2 else
               {"onsetPeriod": {"start": onset.isoformat(), "end": (onset + timedelta(days=90)).isoformat()}}),
        })  # fmt: skip
        out.append({
            "resourceType": "Procedure", "id": f"proc-{n}", "status": "completed", "subject": {"reference": ref},
            "code": {"coding": [{"system": SCT, "code": "80146002" if n % 2 else "73761001"}]},
            "performedPeriod": {"start": onset.isoformat(), "end": (onset + timedelta(days=n % 3)).isoformat()},
            "performer": [{"actor": {"reference": f"Practitioner/{pracs[n % 5]}"}}],
        })  # fmt: skip
        out.append({
            "resourceType": "MedicationRequest", "id": f"med-{n}", "status": "active", "intent": "order",
            "subject": {"reference": ref}, "authoredOn": onset.isoformat(),
            "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": str(860975 + n % 3)}]},
            "requester": {"reference": f"Practitioner/{pracs[n % 5]}"},
        })  # fmt: skip
        out.append({
            "resourceType": "Immunization", "id": f"imm-{n}", "status": "completed", "patient": {"reference": ref},
            "vaccineCode": {"coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": VACCINES[n % 3]}]},
            "occurrenceDateTime": f"{2020 + n % 3}-0{1 + n % 9}-15",
        })  # fmt: skip
        if n % 3:
            out.append({
                "resourceType": "AllergyIntolerance", "id": f"alg-{n}", "patient": {"reference": ref},
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active" if n % 2 else "resolved"}]},
                "code": {"coding": [{"system": SCT, "code": "91936005", "display": "Allergy to penicillin"}]},
                "criticality": "high" if n % 4 else "low", "recordedDate": f"2021-{1 + n % 12:02}-01",
            })  # fmt: skip
        out.append({
            "resourceType": "DocumentReference", "id": f"doc-{n}", "status": "current",
            "identifier": [{"system": "urn:docs", "value": f"D{n}"}],
            "type": {"coding": [{"system": LOINC, "code": "34133-9" if n % 2 else "11488-4"}]},
            "subject": {"reference": ref}, "date": f"2022-03-{1 + n:02}T10:00:00Z",
            "author": [{"reference": f"Practitioner/{pracs[n % 5]}"}],
            "context": {"period": {"start": f"2022-02-{1 + n:02}"}},
            "content": [{"attachment": {"contentType": "text/plain"}}],
        })  # fmt: skip
        if n % 4 == 1:
            out.append({
                "resourceType": "Device", "id": f"dev-{n}", "patient": {"reference": ref},
                "type": {"coding": [{"system": SCT, "code": "14106009", "display": "Cardiac pacemaker"}]},
                "owner": {"reference": f"Organization/{orgs[n % 3]}"},
                "udiCarrier": [{"deviceIdentifier": f"0888{n:04}"}],
            })  # fmt: skip
        weight = round(rng.uniform(50, 90), 1)
        out.append({
            "resourceType": "Observation", "id": f"obs-{n}", "status": "final", "subject": {"reference": ref},
            "code": {"coding": [{"system": LOINC, "code": "29463-7", "display": "Body weight"}], "text": "Body weight"},
            "effectiveDateTime": f"2023-05-{1 + n:02}T09:00:00Z",
            "valueQuantity": {"value": weight if n % 5 else 70.0, "unit": "kg", "system": UCUM, "code": "kg"},
        })  # fmt: skip
    out.extend(measurements(random.Random(seed + 1)))
    return out


#: Numbers at the edges of the searches below (100's range is [99.5, 100.5), ap is ±10 %).
EDGES = ["100", "99.5", "100.5", "99.49", "100.4999", "90", "110", "110.01", "-3", "0",
         "0.25", "0.055", "1e2", "12.0", "0.5", "1"]  # fmt: skip


def measurements(rng: random.Random) -> list[R]:
    """Numbers and quantities: risk probabilities and heights in several units."""
    out: list[R] = []
    for n in range(24):
        edge = EDGES[n % len(EDGES)]
        out.append({
            "resourceType": "RiskAssessment", "id": f"risk-{n}", "status": "final",
            "subject": {"reference": f"Patient/pat-{n}"},
            "prediction": [{"probabilityDecimal": float(edge) if n % 3 else rng.choice([0.1, 0.33, 0.5])}]
            + ([{"probabilityDecimal": round(rng.uniform(0, 1), 3)}] if n % 4 == 0 else []),
        })  # fmt: skip
        unit = [
            ("cm", UCUM, "cm"),
            ("inch", UCUM, "[in_i]"),
            ("centimetre", "http://example.org/units", "cm"),
        ][n % 3]
        value = float(edge) if n % 2 else round(rng.uniform(-5, 200), rng.choice([0, 1, 2]))
        out.append({
            "resourceType": "Observation", "id": f"obs-h-{n}", "status": "final", "subject": {"reference": f"Patient/pat-{n}"},
            "code": {"coding": [{"system": LOINC, "code": "8302-2", "display": "Body height"}]},
            "valueQuantity": {"value": value, "unit": unit[0], "system": unit[1], "code": unit[2]},
        })  # fmt: skip
        out.append({
            "resourceType": "Observation", "id": f"obs-bp-{n}", "status": rng.choice(["final", "amended", "preliminary"]),
            "subject": {"reference": f"Patient/pat-{n}"},
            "code": {"coding": [{"system": LOINC, "code": "85354-9", "display": "Blood pressure"}]},
            "component": [
                {"code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
                 "valueQuantity": {"value": rng.randint(95, 170), "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"}},
                {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
                 "valueQuantity": {"value": rng.randint(55, 105), "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"}},
            ],
        })  # fmt: skip
        if n % 2:
            out.append({
                "resourceType": "Observation", "id": f"obs-lmp-{n}", "status": "final",
                "subject": {"reference": f"Patient/pat-{n}"},
                "code": {"coding": [{"system": LOINC, "code": "8665-2"}]},
                "valueDateTime": (date(2023, 1, 1) + timedelta(days=rng.randint(0, 400))).isoformat(),
            })  # fmt: skip
    return out


DATA = build()


def by_type(rtype: str) -> list[R]:
    return [r for r in DATA if r["resourceType"] == rtype]


def ids(rtype: str, keep: Callable[[R], bool]) -> set[str]:
    return {r["id"] for r in by_type(rtype) if keep(r)}


@pytest.fixture(scope="module")
def node_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("conformance") / "node"
    init_node(root, name="Conformance", passphrase=PW, kdf=KdfParams(n=2**12))

    async def fill() -> None:
        node = open_node(root, PW)
        try:
            await asyncio.gather(
                *(node.records.update(r["resourceType"], r["id"], r) for r in DATA)
            )
        finally:
            await node.close()

    asyncio.run(fill())
    return root


def run_searches(root: Path, queries: list[tuple[str, dict[str, list[str]]]]) -> list[set[str]]:
    async def go() -> list[set[str]]:
        node: Node = open_node(root, PW)
        try:
            return [set(await node.records.search_ids(t, q)) for t, q in queries]
        finally:
            await node.close()

    return asyncio.run(go())


# -- the oracle's helpers: the specification's wording over the input dicts -----------------


def ref_id(reference: R | None, rtype: str) -> str | None:
    """The id a reference names if it names a ``rtype`` (relative or absolute)."""
    if not isinstance(reference, dict):
        return None
    parts = str(reference.get("reference", "")).split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] == rtype else None


def day_range(value: Any) -> tuple[date, date] | None:
    if isinstance(value, dict):
        lo = date.fromisoformat(value["start"][:10]) if "start" in value else date(1800, 1, 1)
        hi = date.fromisoformat(value["end"][:10]) if "end" in value else date(2200, 12, 31)
        return lo, hi
    if isinstance(value, str):
        d = date.fromisoformat(value[:10])
        return d, d
    return None


def number_holds(prefix: str, value: float, search: str) -> bool:
    """FHIR R4 search.html#number: the search value's written precision gives ``eq``,
    ``ne``, ``sa`` and ``eb`` a range; ``ap`` is within 10 % of it."""
    x, v = Decimal(search), Decimal(str(value))
    places = -int(x.as_tuple().exponent)
    lo, hi = x - Decimal(5).scaleb(-places - 1), x + Decimal(5).scaleb(-places - 1)
    return {
        "eq": lo <= v < hi, "ne": not lo <= v < hi, "gt": v > x, "lt": v < x, "ge": v >= x,
        "le": v <= x, "sa": v >= hi, "eb": v < lo, "ap": abs(v - x) <= max(abs(x) / 10, hi - x),
    }[prefix]  # fmt: skip


def unit_holds(quantity: R, unit: str) -> bool:
    """``|system|code`` or ``||code`` (code or unit text) or no unit."""
    if not unit:
        return True
    system, code = unit[1:].split("|")
    if system:
        return bool(quantity.get("system") == system and quantity.get("code") == code)
    return code in (quantity.get("code"), quantity.get("unit"))


def search_range(text: str) -> tuple[date, date]:
    if len(text) == 4:
        return date(int(text), 1, 1), date(int(text), 12, 31)
    if len(text) == 7:
        y, m = int(text[:4]), int(text[5:])
        nxt = date(y + (m == 12), m % 12 + 1, 1)
        return date(y, m, 1), nxt - timedelta(days=1)
    d = date.fromisoformat(text)
    return d, d


def prefix_holds(prefix: str, r: tuple[date, date], value: str) -> bool:
    """FHIR R4 search.html#prefix over the day sets of ``r`` and the search value."""
    p = search_range(value)
    contained = p[0] <= r[0] and r[1] <= p[1]
    above, below = r[1] > p[1], r[0] < p[0]
    return {
        "eq": contained,
        "ne": not contained,
        "gt": above,
        "lt": below,
        "ge": above or contained,
        "le": below or contained,
        "sa": r[0] > p[1],
        "eb": r[1] < p[0],
        "ap": r[0] <= p[1] + timedelta(days=abs((TODAY - p[0]).days) // 10)
        and r[1] >= p[0] - timedelta(days=abs((TODAY - p[0]).days) // 10),
    }[prefix]


def cases() -> Iterator[tuple[str, str, dict[str, list[str]], set[str]]]:
    """(name, type, query, expected ids) for every parameter type and modifier."""
    patients = by_type("Patient")
    some = patients[5]
    # -- string: starts with, case- and accent-insensitive; :exact; several fields
    for prefix in ("sm", "SMY", "oka", "o", "zz"):
        yield f"family {prefix}", "Patient", {"family": [prefix]}, ids(
            "Patient", lambda r, p=prefix: any(_plain(n["family"]).startswith(p.lower()) for n in r["name"])
        )  # fmt: skip
    yield "name given or family", "Patient", {"name": ["ad"]}, ids(
        "Patient", lambda r: any(_plain(w).startswith("ad") for n in r["name"] for w in [n["family"], *n["given"]])
    )  # fmt: skip
    yield (
        "address-city:exact",
        "Patient",
        {"address-city:exact": ["Lund"]},
        ids("Patient", lambda r: r["address"][0]["city"] == "Lund"),
    )
    yield "address-city:exact case", "Patient", {"address-city:exact": ["lund"]}, set()
    yield "organization name", "Organization", {"name": ["lyon"]}, {"org-1"}

    # :contains: anywhere in a value, case and accents ignored (uri: as written)
    def parts(r: R, key: str) -> list[str]:
        value = r.get(key)
        items = value if isinstance(value, list) else [value]
        return [_plain(str(t)) for i in items if i for t in (
            [i] if isinstance(i, str) else [i.get("family"), *i.get("given", []), i.get("city")]) if t]  # fmt: skip

    for needle in ("m", "MY", "ith", "akamu", "Lindqvist", "Ò", "h s", "xyz", "da"):
        yield f"name:contains {needle}", "Patient", {"name:contains": [needle]}, ids(
            "Patient", lambda r, n=needle: any(_plain(n) in t for t in parts(r, "name"))
        )  # fmt: skip
        yield f"family:contains {needle}", "Practitioner", {"family:contains": [needle]}, ids(
            "Practitioner", lambda r, n=needle: any(_plain(n) in _plain(x["family"]) for x in r["name"])
        )  # fmt: skip
    for needle in ("ee", "yon", "o", "und,ee"):
        yield f"address-city:contains {needle}", "Patient", {"address-city:contains": [needle]}, ids(
            "Patient", lambda r, n=needle: any(x in _plain(r["address"][0]["city"]) for x in n.split(","))
        )  # fmt: skip
    for needle in ("general hosp", "fjords", "the f", "centre of the", "hospital"):
        yield f"organization name:contains {needle}", "Organization", {"name:contains": [needle]}, ids(
            "Organization", lambda r, n=needle: n in _plain(r["name"])
        )  # fmt: skip
    for needle in ("special", "StructureDefinition/special-patient", "SPECIAL", "example.org/S"):
        yield f"_profile:contains {needle}", "Patient", {"_profile:contains": [needle]}, ids(
            "Patient", lambda r, n=needle: any(n in u for u in r.get("meta", {}).get("profile", []))
        )  # fmt: skip
    yield (
        "practitioner name prefix",
        "Practitioner",
        {"name": ["dr"]},
        ids("Practitioner", lambda r: True),
    )
    yield "location city", "Location", {"address-city": ["le"]}, {"loc-2"}
    yield "device udi-di", "Device", {"udi-di": ["08880001"]}, {"dev-1"}
    # -- token: code, system|code, |code, system|, :not, :text, :of-type, identifiers
    yield "identifier system|value", "Patient", {"identifier": [f"{MRN}|MRN007"]}, {"pat-7"}
    yield "identifier value", "Patient", {"identifier": ["MRN011,MRN012"]}, {"pat-11", "pat-12"}
    yield (
        "identifier :of-type",
        "Patient",
        {"identifier:of-type": ["http://terminology.hl7.org/CodeSystem/v2-0203|MR|MRN003"]},
        {"pat-3"},
    )
    yield (
        "gender",
        "Patient",
        {"gender": ["female"]},
        ids("Patient", lambda r: r["gender"] == "female"),
    )
    yield (
        "gender:not",
        "Patient",
        {"gender:not": ["female"]},
        ids("Patient", lambda r: r["gender"] != "female"),
    )
    code = CONDITIONS[1][0]
    yield (
        "code system|code",
        "Condition",
        {"code": [f"{SCT}|{code}"]},
        ids("Condition", lambda r: r["code"]["coding"][0]["code"] == code),
    )
    yield "code in another system", "Condition", {"code": [f"{LOINC}|{code}"]}, set()
    yield "code system|", "Condition", {"code": [f"{SCT}|"]}, ids("Condition", lambda r: True)
    yield (
        "code :text",
        "Condition",
        {"code:text": ["asthma"]},
        ids("Condition", lambda r: r["code"]["coding"][0]["code"] == "195967001"),
    )
    yield (
        "code :not",
        "Procedure",
        {"code:not": ["80146002"]},
        ids("Procedure", lambda r: r["code"]["coding"][0]["code"] != "80146002"),
    )
    yield (
        "clinical-status",
        "AllergyIntolerance",
        {"clinical-status": ["resolved"]},
        ids("AllergyIntolerance", lambda r: r["clinicalStatus"]["coding"][0]["code"] == "resolved"),
    )
    yield (
        "criticality",
        "AllergyIntolerance",
        {"criticality": ["low"]},
        ids("AllergyIntolerance", lambda r: r["criticality"] == "low"),
    )
    yield (
        "vaccine-code",
        "Immunization",
        {"vaccine-code": ["208"]},
        ids("Immunization", lambda r: r["vaccineCode"]["coding"][0]["code"] == "208"),
    )
    yield (
        "encounter class",
        "Encounter",
        {"class": ["IMP"], "status": ["finished"]},
        ids("Encounter", lambda r: r["class"]["code"] == "IMP" and r["status"] == "finished"),
    )
    yield (
        "document type",
        "DocumentReference",
        {"type": [f"{LOINC}|11488-4"]},
        ids("DocumentReference", lambda r: r["type"]["coding"][0]["code"] == "11488-4"),
    )
    yield "role", "PractitionerRole", {"role": ["158965000"]}, {"role-1", "role-3"}
    yield "_id", "Patient", {"_id": ["pat-1,pat-2,nope"]}, {"pat-1", "pat-2"}
    yield "_tag", "Patient", {"_tag": [f"{TAG}|vip"]}, ids("Patient", lambda r: "meta" in r)
    yield "_security", "Patient", {"_security": ["R"]}, ids("Patient", lambda r: "meta" in r)
    # -- uri
    yield "_profile", "Patient", {"_profile": [PROFILE]}, ids("Patient", lambda r: "meta" in r)
    # -- reference: id, Type/id, absolute URL, type modifier, many targets
    pid = some["id"]
    about = lambda r, p=pid: ref_id(r.get("subject") or r.get("patient"), "Patient") == p  # noqa: E731
    for rtype in ("Encounter", "Condition", "Procedure", "MedicationRequest", "Immunization",
                  "AllergyIntolerance", "DocumentReference", "Device", "Observation"):  # fmt: skip
        yield f"{rtype} patient", rtype, {"patient": [pid]}, ids(rtype, about)
        yield f"{rtype} patient url", rtype, {
            "patient": [f"http://other.host/fhir/Patient/{pid}"]
        }, ids(rtype, lambda r, p=pid: ref_id(r.get("subject") or r.get("patient"), "Patient") == p
               and "://" not in (r.get("subject") or r.get("patient"))["reference"])  # fmt: skip
    absolute = "https://ehr.example.org/fhir/Patient/pat-0"
    yield (
        "absolute reference as written",
        "Encounter",
        {"subject": [absolute]},
        ids("Encounter", lambda r: r["subject"]["reference"] == absolute),
    )
    yield "subject:Patient", "Encounter", {"subject:Patient": [pid]}, ids("Encounter", about)
    yield (
        "participant",
        "Encounter",
        {"participant": ["Practitioner/prac-2"]},
        ids(
            "Encounter",
            lambda r: r["participant"][0]["individual"]["reference"] == "Practitioner/prac-2",
        ),
    )
    yield (
        "service-provider",
        "Encounter",
        {"service-provider": ["org-1"]},
        ids("Encounter", lambda r: r["serviceProvider"]["reference"] == "Organization/org-1"),
    )
    yield "practitioner of role", "PractitionerRole", {"practitioner": ["prac-4"]}, {"role-4"}
    yield (
        "location organization",
        "Location",
        {"organization": ["Organization/org-0"]},
        {"loc-0", "loc-3"},
    )
    yield (
        "device owner",
        "Device",
        {"organization": ["org-2"]},
        ids("Device", lambda r: r["owner"]["reference"] == "Organization/org-2"),
    )
    yield (
        "document author",
        "DocumentReference",
        {"author": ["Practitioner/prac-0"]},
        ids("DocumentReference", lambda r: r["author"][0]["reference"] == "Practitioner/prac-0"),
    )
    # -- :missing
    yield (
        "birthdate:missing",
        "Patient",
        {"birthdate:missing": ["true"]},
        ids("Patient", lambda r: "birthDate" not in r),
    )
    yield (
        "location:missing",
        "Encounter",
        {"location:missing": ["false"]},
        ids("Encounter", lambda r: "location" in r),
    )
    # -- numbers and quantities (every prefix, units), dates (every prefix, Periods as ranges)
    yield (
        "value-quantity",
        "Observation",
        {"value-quantity": [f"70|{UCUM}|kg"]},
        ids("Observation", lambda r: r.get("valueQuantity", {}).get("code") == "kg"
            and number_holds("eq", r["valueQuantity"]["value"], "70")),
    )  # fmt: skip
    yield (
        "value-quantity number only",
        "Observation",
        {"value-quantity": ["70.0"]},
        ids(
            "Observation",
            lambda r: (
                "valueQuantity" in r and number_holds("eq", r["valueQuantity"]["value"], "70.0")
            ),
        ),
    )
    for search in ("100", "100.0", "1e2", "99.5", "-3", "0", "0.25", "12", "110"):
        for prefix in ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"):
            for unit in ("", f"|{UCUM}|cm", "||cm", "||inch", f"|{UCUM}|[in_i]"):
                yield (
                    f"height {prefix}{search}{unit}",
                    "Observation",
                    {"value-quantity": [prefix + search + unit]},
                    ids("Observation", lambda r, p=prefix, s=search, u=unit:
                        "valueQuantity" in r and unit_holds(r["valueQuantity"], u)
                        and number_holds(p, r["valueQuantity"]["value"], s)),
                )  # fmt: skip
            yield (
                f"probability {prefix}{search}",
                "RiskAssessment",
                {"probability": [prefix + search]},
                ids("RiskAssessment", lambda r, p=prefix, s=search: any(
                    number_holds(p, x["probabilityDecimal"], s) for x in r["prediction"])
                    if p != "ne" else not any(number_holds("eq", x["probabilityDecimal"], s) for x in r["prediction"])),
            )  # fmt: skip

    # -- composites: a token and a quantity, a date, in the resource or in its components
    def codes(concept: R) -> set[tuple[str, str]]:
        return {(c.get("system", ""), c["code"]) for c in concept.get("coding", [])}

    def token_holds(concept: R, token: str) -> bool:
        system, _, code = token.rpartition("|")
        return any(c == code and (not system or s == system) for s, c in codes(concept))

    for token in (f"{LOINC}|29463-7", "8302-2", f"{LOINC}|8480-6", "8462-4", f"{SCT}|8302-2"):
        for value in ("gt70", "lt100", "le65.5", "ap150", "eq100", "sa90", "eb60", "ge140"):
            prefix, number = value[:2], value[2:]
            yield f"code-value-quantity {token}${value}", "Observation", {
                "code-value-quantity": [f"{token}${value}"]
            }, ids("Observation", lambda r, t=token, p=prefix, x=number: "valueQuantity" in r
                   and token_holds(r["code"], t) and number_holds(p, r["valueQuantity"]["value"], x))  # fmt: skip
            yield f"component-code-value-quantity {token}${value}", "Observation", {
                "component-code-value-quantity": [f"{token}${value}"]
            }, ids("Observation", lambda r, t=token, p=prefix, x=number: any(
                token_holds(c["code"], t) and number_holds(p, c["valueQuantity"]["value"], x)
                for c in r.get("component", [])))  # fmt: skip
            yield f"combo-code-value-quantity {token}${value}", "Observation", {
                "combo-code-value-quantity": [f"{token}${value}"]
            }, ids("Observation", lambda r, t=token, p=prefix, x=number: any(
                token_holds(e["code"], t) and "valueQuantity" in e and number_holds(p, e["valueQuantity"]["value"], x)
                for e in [r, *r.get("component", [])]))  # fmt: skip

    def lmp_holds(r: R, value: str) -> bool:
        prefix = value[:2] if value[:2].isalpha() else "eq"
        text = value[2:] if value[:2].isalpha() else value
        day = day_range(r.get("valueDateTime"))
        return day is not None and prefix_holds(prefix, day, text)

    for value in ("2023", "ge2023-06", "lt2023-03-15", "2024-01", "sa2023-10", "ap2023-05"):
        yield (
            f"code-value-date {value}",
            "Observation",
            {"code-value-date": [f"{LOINC}|8665-2${value}"]},
            ids("Observation", lambda r, v=value: lmp_holds(r, v)),
        )
    # -- :in and :not-in a value set the node knows; uri :below and :above
    gender_vs = "http://hl7.org/fhir/ValueSet/administrative-gender"
    yield "gender:in", "Patient", {"gender:in": [gender_vs]}, ids("Patient", lambda r: True)
    yield "gender:not-in", "Patient", {"gender:not-in": [gender_vs]}, set()
    status_vs = "http://hl7.org/fhir/ValueSet/observation-status"
    yield "status:in", "Observation", {"status:in": [status_vs]}, ids("Observation", lambda r: True)
    clinical = "http://hl7.org/fhir/ValueSet/allergyintolerance-clinical"
    yield "clinical-status:in", "AllergyIntolerance", {"clinical-status:in": [clinical]}, ids(
        "AllergyIntolerance", lambda r: True)  # fmt: skip
    yield "clinical-status:not-in other", "Condition", {"clinical-status:not-in": [clinical]}, ids(
        "Condition", lambda r: True)  # fmt: skip
    yield "clinical-status:in other", "Condition", {"clinical-status:in": [clinical]}, set()
    for base in ("http://example.org", "http://example.org/StructureDefinition",
                 "http://example.org/StructureDefinition/", PROFILE, "http://example.org/Struct",
                 "http://other.org"):  # fmt: skip
        yield f"_profile:below {base}", "Patient", {"_profile:below": [base]}, ids(
            "Patient", lambda r, b=base: any(
                u == b.rstrip("/") or u.startswith(b.rstrip("/") + "/") for u in r.get("meta", {}).get("profile", [])))  # fmt: skip
    for above in (PROFILE, PROFILE + "/v2/x", "http://example.org/StructureDefinition"):
        yield f"_profile:above {above}", "Patient", {"_profile:above": [above]}, ids(
            "Patient", lambda r, a=above: any(
                a == u or a.startswith(u + "/") for u in r.get("meta", {}).get("profile", [])))  # fmt: skip
    rng = random.Random(5)
    date_params = [
        ("Encounter", "date", lambda r: r["period"]),
        ("Procedure", "date", lambda r: r["performedPeriod"]),
        ("Condition", "onset-date", lambda r: r.get("onsetDateTime") or r.get("onsetPeriod")),
        ("DocumentReference", "period", lambda r: r["context"]["period"]),
        ("Patient", "birthdate", lambda r: r.get("birthDate")),
    ]
    for rtype, param, value_of in date_params:
        for _ in range(4):
            values = [day_range(value_of(r)) for r in by_type(rtype)]
            lo, hi = min(v[0] for v in values if v), max(v[0] for v in values if v)
            day = lo + timedelta(days=rng.randint(0, (hi - lo).days))
            text = day.isoformat()[: rng.choice([4, 7, 10])]
            for prefix in ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"):
                yield (
                    f"{rtype} {param} {prefix}{text}",
                    rtype,
                    {param: [prefix + text]},
                    {
                        r["id"]
                        for r in by_type(rtype)
                        if (rr := day_range(value_of(r))) is not None
                        and prefix_holds(prefix, rr, text)
                    },
                )

    # -- chained parameters and _has (through relative references: an absolute URL
    #    names another server's resource)
    def relative_patient(r: R) -> R | None:
        ref = (r.get("subject") or r.get("patient") or {}).get("reference", "")
        return next((p for p in patients if ref == f"Patient/{p['id']}"), None)

    yield "chain subject:Patient.family", "Encounter", {"subject:Patient.family": ["sm"]}, ids(
        "Encounter",
        lambda r: (p := relative_patient(r)) is not None and p["name"][0]["family"].lower().startswith("sm"),
    )  # fmt: skip
    yield "chain subject.birthdate", "Condition", {"subject.birthdate": ["lt1960"]}, ids(
        "Condition",
        lambda r: (p := relative_patient(r)) is not None and p.get("birthDate", "9999") < "1960",
    )  # fmt: skip
    yield (
        "chain service-provider.name",
        "Encounter",
        {"service-provider.name": ["lyon"]},
        ids("Encounter", lambda r: r["serviceProvider"]["reference"] == "Organization/org-1"),
    )
    yield "chain two deep", "Encounter", {"participant:Practitioner.name": ["okafor"], "location.organization.name": ["lund"]}, ids(
        "Encounter",
        lambda r: r["participant"][0]["individual"]["reference"] == "Practitioner/prac-2"
        and any(loc["location"]["reference"] in ("Location/loc-0", "Location/loc-3") for loc in r.get("location", [])),
    )  # fmt: skip
    yield (
        "_has",
        "Patient",
        {"_has:Encounter:subject:status": ["in-progress"]},
        {
            p["id"]
            for p in patients
            for e in by_type("Encounter")
            if e["status"] == "in-progress" and e["subject"]["reference"] == f"Patient/{p['id']}"
        },
    )
    yield "_has with a chain", "Practitioner", {"_has:PractitionerRole:practitioner:organization.name": ["lyon"]}, {
        "prac-1", "prac-4"
    }  # fmt: skip
    # In progress on a given day: one of the issue's silently wrong searches.
    day = "2019-06-01"
    yield (
        "encounters in progress",
        "Encounter",
        {"date": [f"le{day}", f"ge{day}"]},
        ids(
            "Encounter",
            lambda r: day_range(r["period"])[0] <= date(2019, 6, 1) <= day_range(r["period"])[1],  # type: ignore[index]
        ),
    )


CASES = list(cases())


def test_the_dataset_is_shaped_like_the_issue() -> None:
    types = {r["resourceType"] for r in DATA}
    assert types >= {
        "Patient", "Encounter", "Condition", "Procedure", "MedicationRequest", "Immunization",
        "DocumentReference", "AllergyIntolerance", "Device", "Location", "Organization",
        "Practitioner", "PractitionerRole",
    }  # fmt: skip
    assert 250 <= len(DATA) <= 500
    # Ongoing stays, absolute references and empty answers are all exercised.
    assert any("end" not in r["period"] for r in by_type("Encounter"))
    assert any(not expected for *_, expected in CASES)
    assert sum(1 for *_, expected in CASES if expected) > len(CASES) // 2


def test_every_search_matches_the_oracle(node_root: Path) -> None:
    found = run_searches(node_root, [(t, q) for _, t, q, _ in CASES])
    wrong = [
        (name, sorted(expected - got)[:3], sorted(got - expected)[:3])
        for (name, _, _, expected), got in zip(CASES, found, strict=True)
        if got != expected
    ]
    assert not wrong, f"{len(wrong)} of {len(CASES)} searches differ (missing, extra): {wrong[:8]}"


def test_sort_orders_by_the_decrypted_values(node_root: Path) -> None:
    """``_sort``: ascending by the lowest value, descending by the highest, missing last."""

    async def go() -> list[list[str]]:
        node = open_node(node_root, PW)
        try:
            out = []
            for sort in (["birthdate"], ["-birthdate"], ["family,-_id"], ["-date"]):
                rtype = "Encounter" if sort == ["-date"] else "Patient"
                _, page = await node.records.search_page(rtype, {}, 0, 1000, sort=sort)
                out.append([s.id for s in page])
            return out
        finally:
            await node.close()

    by_birth, by_birth_desc, by_family, by_end_desc = asyncio.run(go())
    patients = by_type("Patient")
    born = sorted((p for p in patients if "birthDate" in p), key=lambda p: p["birthDate"])
    unborn = [p["id"] for p in patients if "birthDate" not in p]
    assert by_birth[: len(born)] == [p["id"] for p in born]
    assert sorted(by_birth[len(born) :]) == sorted(unborn)
    assert by_birth_desc[: len(born)] == [p["id"] for p in reversed(born)]
    expected = sorted(patients, key=lambda p: p["id"], reverse=True)
    expected = sorted(expected, key=lambda p: p["name"][0]["family"].lower())
    assert by_family == [p["id"] for p in expected]
    ends = [day_range(e["period"])[1] for e in by_type("Encounter")]  # type: ignore[index]
    got = {e["id"]: day_range(e["period"])[1] for e in by_type("Encounter")}  # type: ignore[index]
    assert [got[i] for i in by_end_desc] == sorted(ends, reverse=True)


def test_include_and_revinclude(node_root: Path) -> None:
    async def go() -> tuple[set[str], set[str], set[str]]:
        node = open_node(node_root, PW)
        try:
            encounters = await node.records.search("Encounter", {"patient": ["pat-1"]})
            forward = await node.records.included(
                encounters, [("Encounter:participant:Practitioner", False)], []
            )
            patients = await node.records.search("Patient", {"_id": ["pat-1"]})
            reverse = await node.records.included(
                patients, [], [("Encounter:subject", False), ("Condition:patient", False)]
            )
            iterated = await node.records.included(
                patients,
                [("Encounter:service-provider", True)],
                [("Encounter:subject", False)],
            )
            keys = lambda found: {f"{s.resource_type}/{s.id}" for s in found}  # noqa: E731
            return keys(forward), keys(reverse), keys(iterated)
        finally:
            await node.close()

    forward, reverse, iterated = asyncio.run(go())
    mine = [e for e in by_type("Encounter") if e["subject"]["reference"] == "Patient/pat-1"]
    assert forward == {e["participant"][0]["individual"]["reference"] for e in mine}
    assert reverse == {f"Encounter/{e['id']}" for e in mine} | {"Condition/cond-1"}
    assert iterated == {f"Encounter/{e['id']}" for e in mine} | {
        e["serviceProvider"]["reference"] for e in mine
    }
