"""Deterministic synthetic patients as FHIR R4 JSON, so tests, the demo and benchmarks never need real data.

Contract
--------
* :func:`generate_patient` ``(index, seed=0, resources_per_patient=100)`` builds one
  :class:`PatientBundle`: a ``Patient`` plus exactly ``resources_per_patient``
  clinical resources (``Encounter``, ``Observation``, ``Condition``,
  ``MedicationRequest``, ``AllergyIntolerance``, ``Immunization``,
  ``Procedure``, ``DiagnosticReport``). :func:`iter_patients` and
  :func:`generate_patients` yield/return patients ``start_index ..
  start_index + count - 1``.
* **Deterministic**: patient *k* is a pure function of ``(seed, k,
  resources_per_patient)``. Each patient draws from its own
  ``random.Random(f"{seed}:{k}")``, so it is byte-identical whatever ``count``
  or ``start_index`` it was generated with, across processes and machines.
  No clock, no global random state, no ``uuid4``, no I/O.
* **Prefix-stable**: the ``Patient`` does not depend on
  ``resources_per_patient``, and the clinical resources generated for *n* are
  the first *n* of those generated for any *m > n*.
* **Referentially closed, in dependency order**: every clinical resource
  references its patient (``subject``, or ``patient`` for
  ``AllergyIntolerance`` and ``Immunization``) as ``{"reference":
  "Patient/<id>"}``; every other reference (``encounter``, ``reasonReference``,
  ``result``) points to a resource *earlier* in ``resources``. Loading the
  resources in order never meets a dangling reference, and any prefix is
  closed too.
* **Ids** are UUID-shaped lowercase hex drawn from the patient's generator (128
  bits, so unique with overwhelming probability; valid FHIR ids).
* **Codes are real**: LOINC (``http://loinc.org``), SNOMED CT
  (``http://snomed.info/sct``), RxNorm
  (``http://www.nlm.nih.gov/research/umls/rxnorm``), CVX
  (``http://hl7.org/fhir/sid/cvx``), UCUM units (``http://unitsofmeasure.org``),
  HL7 terminology for statuses and categories.
* **People are fictional**: common first/last names combined at random,
  invented cities, phone numbers in the reserved 555-01xx range, MRNs under
  :data:`~medledger.synthetic.catalog.MRN_SYSTEM`, an OID in HL7's arc reserved for examples
  (2.16.840.1.113883.19). Everyone is an adult (born 1930-2005); all dates
  lie between 1930-01-01 and 2025-06-30. ``birthDate`` is ``YYYY-MM-DD``,
  date-times are ``YYYY-MM-DDThh:mm:ssZ``.
* **Values look like real data**: some ``valueQuantity.value`` are floats
  (FHIR decimals such as HbA1c 6.8 %, weight 81.4 kg). Such resources are
  therefore *not* canonical JSON (``core.encoding`` rejects floats);
  serialize them as FHIR JSON (``json.dumps`` or ``services.fhir``).
* Output is plain ``dict``/``list``/``str``/``int``/``float``/``bool``, built
  fresh on every call (callers may mutate it), valid against the
  ``fhir.resources`` R4B models (checked by the tests, not here: speed).
  1,000 patients x 100 resources take ~1.5 s streamed with
  :func:`iter_patients`, ~3 s as one list (2-core CI-class machine).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from typing import Any, TypeAlias

from medledger.core.errors import InvalidInput
from medledger.synthetic import catalog

__all__ = [
    "PatientBundle",
    "Resource",
    "all_resource_types",
    "generate_patient",
    "generate_patients",
    "iter_patients",
]

#: A FHIR resource as its JSON object.
Resource: TypeAlias = dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class PatientBundle:
    """One synthetic patient: its ``Patient`` and clinical resources, in dependency order.

    The dicts are fresh for every generation call; mutating them affects no one else.
    """

    index: int
    patient: Resource
    resources: tuple[Resource, ...]

    @property
    def patient_id(self) -> str:
        """The ``Patient`` resource's id."""
        return str(self.patient["id"])

    def all_resources(self) -> tuple[Resource, ...]:
        """``Patient`` first, then the clinical resources: an order safe to load in."""
        return (self.patient, *self.resources)


def all_resource_types() -> tuple[str, ...]:
    """The FHIR resource types the generator produces, ``Patient`` first."""
    return catalog.RESOURCE_TYPES


def generate_patient(
    index: int, *, seed: int = 0, resources_per_patient: int = 100
) -> PatientBundle:
    """Patient number ``index`` of the synthetic population ``seed``.

    Requires ``index >= 0`` and ``resources_per_patient >= 0`` (else
    :class:`InvalidInput`). The bundle holds exactly ``resources_per_patient``
    clinical resources besides the ``Patient``.
    """
    if index < 0:
        raise InvalidInput(f"synthetic patient index must be >= 0, got {index}")
    if resources_per_patient < 0:
        raise InvalidInput(f"resources_per_patient must be >= 0, got {resources_per_patient}")
    rng = random.Random(f"{seed}:{index}")  # noqa: S311 - synthetic data, not cryptography
    return _PatientBuilder(rng, index).build(resources_per_patient)


def iter_patients(
    count: int, *, seed: int = 0, start_index: int = 0, resources_per_patient: int = 100
) -> Iterator[PatientBundle]:
    """Lazily yield patients ``start_index .. start_index + count - 1`` (see :func:`generate_patient`).

    Arguments are checked at the call, not at the first ``next()``. Streaming
    keeps memory flat and avoids the garbage collector's bookkeeping of a
    large live list, so it is the fastest way to feed a benchmark.
    """
    if count < 0:
        raise InvalidInput(f"synthetic patient count must be >= 0, got {count}")
    if start_index < 0:
        raise InvalidInput(f"synthetic start_index must be >= 0, got {start_index}")
    if resources_per_patient < 0:
        raise InvalidInput(f"resources_per_patient must be >= 0, got {resources_per_patient}")
    return (
        generate_patient(index, seed=seed, resources_per_patient=resources_per_patient)
        for index in range(start_index, start_index + count)
    )


def generate_patients(
    count: int, *, seed: int = 0, start_index: int = 0, resources_per_patient: int = 100
) -> list[PatientBundle]:
    """Patients ``start_index .. start_index + count - 1`` as a list (see :func:`generate_patient`)."""
    return list(
        iter_patients(
            count, seed=seed, start_index=start_index, resources_per_patient=resources_per_patient
        )
    )


# --- JSON fragments --------------------------------------------------------------------


def _concept(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _status(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


def _ref(resource: Resource) -> dict[str, str]:
    return {"reference": f"{resource['resourceType']}/{resource['id']}"}


def _quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": catalog.UCUM, "code": unit}


def _date(day: int) -> str:
    return date.fromordinal(day).isoformat()


def _datetime(day: int, second: int) -> str:
    """``YYYY-MM-DDThh:mm:ssZ``; requires ``0 <= second < 86400``."""
    return f"{date.fromordinal(day).isoformat()}T{second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}Z"


def _new_id(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _clamp(value: float, low: float, high: float) -> float:
    return low if value < low else high if value > high else value


@dataclass(slots=True)
class _Chronic:
    disease: catalog.Disease
    onset: int
    regimen: tuple[catalog.Med, ...]
    resource: Resource


class _PatientBuilder:
    """Draws one patient from ``rng``; every draw happens in a fixed order."""

    __slots__ = (
        "birth",
        "chronic",
        "given_once",
        "height_cm",
        "index",
        "out",
        "patient",
        "patient_ref",
        "penicillin_allergy",
        "rng",
        "sex",
        "weight_kg",
    )

    def __init__(self, rng: random.Random, index: int) -> None:
        self.rng = rng
        self.index = index
        self.out: list[Resource] = []
        self.chronic: list[_Chronic] = []
        self.given_once: set[str] = set()
        self.penicillin_allergy = False
        self.sex = ""
        self.birth = 0
        self.height_cm = 0
        self.weight_kg = 0.0
        self.patient: Resource = {}
        self.patient_ref: dict[str, str] = {}

    def build(self, limit: int) -> PatientBundle:
        self._patient()
        self._chronic_conditions()
        self._allergies()
        while len(self.out) < limit:
            self._encounter()
        return PatientBundle(
            index=self.index, patient=self.patient, resources=tuple(self.out[:limit])
        )

    # --- patient-level ---------------------------------------------------------------

    def _patient(self) -> None:
        rng = self.rng
        r = rng.random()
        self.sex = (
            "male" if r < 0.49 else "female" if r < 0.98 else "other" if r < 0.99 else "unknown"
        )
        names = (
            catalog.GIVEN_MALE
            if self.sex == "male"
            else catalog.GIVEN_FEMALE
            if self.sex == "female"
            else catalog.GIVEN_ANY
        )
        given = [rng.choice(names)]
        if rng.random() < 0.5:
            given.append(rng.choice(names))
        self.birth = rng.randint(catalog.BIRTH_FIRST, catalog.BIRTH_LAST)
        tall = self.sex == "male" or (self.sex != "female" and rng.random() < 0.5)
        self.height_cm = round(_clamp(rng.gauss(176 if tall else 162, 7), 145, 205))
        bmi = _clamp(rng.gauss(27.5, 5.0), 17.0, 48.0)
        self.weight_kg = bmi * (self.height_cm / 100) ** 2
        pid = _new_id(rng)
        self.patient = {
            "resourceType": "Patient",
            "id": pid,
            "identifier": [
                {
                    "use": "usual",
                    "type": _concept(catalog.V2_0203, "MR", "Medical record number"),
                    "system": catalog.MRN_SYSTEM,
                    "value": f"MRN{self.index:08d}",
                    "assigner": {"display": catalog.HOSPITAL},
                }
            ],
            "active": True,
            "name": [{"use": "official", "family": rng.choice(catalog.FAMILY), "given": given}],
            "telecom": [
                {"system": "phone", "value": f"555-01{rng.randrange(100):02d}", "use": "home"}
            ],
            "gender": self.sex,
            "birthDate": _date(self.birth),
            "address": [
                {
                    "use": "home",
                    "type": "physical",
                    "line": [
                        f"{rng.randint(1, 9999)} {rng.choice(catalog.STREETS)} {rng.choice(catalog.STREET_KINDS)}"
                    ],
                    "city": rng.choice(catalog.CITIES),
                    "postalCode": f"{rng.randrange(10000, 100000)}",
                    "country": "US",
                }
            ],
        }
        self.patient_ref = {"reference": f"Patient/{pid}"}

    def age(self, day: int) -> float:
        return (day - self.birth) / 365.2425

    def care_start(self) -> int:
        return max(self.birth + catalog.ADULT_DAYS, catalog.CARE_FIRST)

    def _chronic_conditions(self) -> None:
        rng = self.rng
        obese = self.weight_kg / (self.height_cm / 100) ** 2 >= 30
        for disease in (*catalog.CHRONIC, catalog.OBESITY):
            if disease is catalog.OBESITY:
                chance = 1.0 if obese else 0.0
            elif disease is catalog.DIABETES and obese:
                chance = 0.25
            else:
                chance = disease.prevalence
            if rng.random() >= chance:
                continue
            first = max(self.birth + round(disease.min_age * 365.2425), catalog.BIRTH_FIRST)
            if first > catalog.END:
                continue
            onset = rng.randint(first, catalog.END)
            regimen = rng.choice(disease.regimens)
            resource = self.condition(
                (disease.code, disease.display), onset, rng.randrange(8 * 3600, 17 * 3600)
            )
            self.chronic.append(_Chronic(disease, onset, regimen, resource))

    def condition(
        self,
        code: catalog.Code,
        day: int,
        second: int,
        *,
        encounter: Resource | None = None,
        resolved_day: int | None = None,
    ) -> Resource:
        when = _datetime(day, second)
        resolved = resolved_day is not None and resolved_day <= catalog.END
        resource: Resource = {
            "resourceType": "Condition",
            "id": _new_id(self.rng),
            "clinicalStatus": _status(catalog.COND_CLINICAL, "resolved" if resolved else "active"),
            "verificationStatus": _status(catalog.COND_VERIFICATION, "confirmed"),
            "category": [
                _status(
                    catalog.COND_CATEGORY,
                    "encounter-diagnosis" if encounter else "problem-list-item",
                )
            ],
            "code": _concept(catalog.SNOMED, *code),
            "subject": dict(self.patient_ref),
            "onsetDateTime": when,
            "recordedDate": when,
        }
        if encounter is not None:
            resource["encounter"] = _ref(encounter)
        if resolved and resolved_day is not None:
            resource["abatementDateTime"] = _datetime(resolved_day, second)
        self.out.append(resource)
        return resource

    def _allergies(self) -> None:
        rng = self.rng
        r = rng.random()
        count = 0 if r < 0.6 else 1 if r < 0.85 else 2 if r < 0.95 else 3
        for code, display, category in rng.sample(catalog.ALLERGIES, count):
            reaction = rng.choice(catalog.REACTIONS[category])
            severe = reaction is catalog.ANAPHYLAXIS
            if code == catalog.PENICILLIN_ALLERGY:
                self.penicillin_allergy = True
            day = rng.randint(self.care_start(), catalog.END)
            self.out.append(
                {
                    "resourceType": "AllergyIntolerance",
                    "id": _new_id(rng),
                    "clinicalStatus": _status(catalog.ALLERGY_CLINICAL, "active"),
                    "verificationStatus": _status(catalog.ALLERGY_VERIFICATION, "confirmed"),
                    "type": "allergy",
                    "category": [category],
                    "criticality": "high" if severe else "low",
                    "code": _concept(catalog.SNOMED, code, display),
                    "patient": dict(self.patient_ref),
                    "recordedDate": _datetime(day, rng.randrange(8 * 3600, 17 * 3600)),
                    "reaction": [
                        {
                            "manifestation": [_concept(catalog.SNOMED, *reaction)],
                            "severity": "severe" if severe else rng.choice(("mild", "moderate")),
                        }
                    ],
                }
            )

    # --- encounters ------------------------------------------------------------------

    def _encounter(self) -> None:
        rng = self.rng
        day = rng.randint(self.care_start(), catalog.END)
        start = rng.randrange(8 * 3600, 17 * 3600, 300)
        end = start + rng.choice((15, 20, 30, 45, 60)) * 60
        active = [c for c in self.chronic if c.onset <= day]
        r = rng.random()
        kind, reason = catalog.CHECKUP, None
        if r < 0.2:
            kind = catalog.SYMPTOM
        elif r < 0.55 and active:
            kind, reason = catalog.FOLLOW_UP, rng.choice(active)
        encounter: Resource = {
            "resourceType": "Encounter",
            "id": _new_id(rng),
            "status": "finished",
            "class": {"system": catalog.ACT_CODE, "code": "AMB", "display": "ambulatory"},
            "type": [_concept(catalog.SNOMED, *kind)],
            "subject": dict(self.patient_ref),
            "period": {"start": _datetime(day, start), "end": _datetime(day, end)},
        }
        if reason is not None:
            encounter["reasonReference"] = [_ref(reason.resource)]
        self.out.append(encounter)
        visit = _Visit(self, encounter, day, start)
        if kind is catalog.SYMPTOM:
            visit.symptom()
        elif reason is not None:
            visit.follow_up(reason, active)
        else:
            visit.checkup(active)


class _Visit:
    """The resources of one encounter, each referencing it and the patient."""

    __slots__ = ("date", "day", "enc", "encounter", "p", "rng", "start", "subject", "times")

    def __init__(self, p: _PatientBuilder, encounter: Resource, day: int, start: int) -> None:
        self.p = p
        self.rng = p.rng
        self.encounter = encounter
        self.day = day
        self.start = start
        # Precomputed strings: this is the hot path (~75 % of resources are observations).
        self.date = date.fromordinal(day).isoformat()
        self.subject = p.patient_ref["reference"]
        self.enc = f"Encounter/{encounter['id']}"
        self.times: dict[int, str] = {}

    def _when(self, minutes: int) -> str:
        when = self.times.get(minutes)
        if when is None:
            second = self.start + minutes * 60
            when = f"{self.date}T{second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}Z"
            self.times[minutes] = when
        return when

    def _observation(
        self, category: str, loinc: tuple[str, str, str], value: float, minutes: int
    ) -> Resource:
        code, display, unit = loinc
        when = self._when(minutes)
        vital = category == "vital-signs"
        label = "Vital Signs" if vital else "Laboratory"
        resource: Resource = {
            "resourceType": "Observation",
            "id": _new_id(self.rng),
            "status": "final",
            "category": [
                {
                    "coding": [
                        {"system": catalog.OBS_CATEGORY, "code": category, "display": label}
                    ],
                    "text": label,
                }
            ],
            "code": {
                "coding": [{"system": catalog.LOINC, "code": code, "display": display}],
                "text": display,
            },
            "subject": {"reference": self.subject},
            "encounter": {"reference": self.enc},
            "effectiveDateTime": when,
            "issued": when if vital else self._when(minutes + 120),
            "valueQuantity": {"value": value, "unit": unit, "system": catalog.UCUM, "code": unit},
        }
        self.p.out.append(resource)
        return resource

    def _vital(self, loinc: tuple[str, str, str], value: float) -> Resource:
        return self._observation("vital-signs", loinc, value, 5)

    def _lab(self, loinc: tuple[str, str, str], value: float) -> Resource:
        return self._observation("laboratory", loinc, value, 10)

    def _base(self, resource_type: str, subject_key: str = "subject") -> Resource:
        """Id plus the patient (under ``subject_key``) and encounter references."""
        return {
            "resourceType": resource_type,
            "id": _new_id(self.rng),
            subject_key: {"reference": self.subject},
            "encounter": {"reference": self.enc},
        }

    def _has(self, disease: catalog.Disease, active: list[_Chronic]) -> bool:
        return any(c.disease is disease for c in active)

    # --- vitals ----------------------------------------------------------------------

    def vitals(self, active: list[_Chronic], *, full: bool, fever: bool = False) -> None:
        rng, p = self.rng, self.p
        self._vital(catalog.HEART_RATE, round(_clamp(rng.gauss(90 if fever else 72, 10), 45, 140)))
        hypertensive = self._has(catalog.HYPERTENSION, active)
        systolic = round(_clamp(rng.gauss(142 if hypertensive else 118, 12), 90, 200))
        diastolic = round(_clamp(rng.gauss(88 if hypertensive else 76, 8), 50, systolic - 25))
        bp = self._base("Observation")
        when = self._when(5)
        bp.update(
            {
                "status": "final",
                "category": [_concept(catalog.OBS_CATEGORY, "vital-signs", "Vital Signs")],
                "code": _concept(catalog.LOINC, *catalog.BP_PANEL),
                "effectiveDateTime": when,
                "issued": when,
                "component": [
                    {
                        "code": _concept(catalog.LOINC, *catalog.SYSTOLIC[:2]),
                        "valueQuantity": _quantity(systolic, catalog.SYSTOLIC[2]),
                    },
                    {
                        "code": _concept(catalog.LOINC, *catalog.DIASTOLIC[:2]),
                        "valueQuantity": _quantity(diastolic, catalog.DIASTOLIC[2]),
                    },
                ],
            }
        )
        p.out.append(bp)
        temperature = rng.gauss(38.3, 0.5) if fever else rng.gauss(36.8, 0.25)
        self._vital(catalog.BODY_TEMP, round(_clamp(temperature, 35.5, 40.5), 1))
        weight = round(_clamp(p.weight_kg + rng.gauss(0, 1.5), 40, 200), 1)
        self._vital(catalog.WEIGHT, weight)
        if full:
            lungs = self._has(catalog.COPD, active) or self._has(catalog.ASTHMA, active)
            self._vital(catalog.HEIGHT, p.height_cm)
            self._vital(catalog.BMI, round(weight / (p.height_cm / 100) ** 2, 1))
            self._vital(catalog.RESP_RATE, round(_clamp(rng.gauss(18 if lungs else 15, 2), 10, 30)))
            self._vital(catalog.SPO2, round(_clamp(rng.gauss(94 if lungs else 98, 1.5), 85, 100)))

    # --- labs ------------------------------------------------------------------------

    def _report(self, panel: catalog.Code, results: list[Resource]) -> None:
        report = self._base("DiagnosticReport")
        report.update(
            {
                "status": "final",
                "category": [_concept(catalog.V2_0074, "LAB", "Laboratory")],
                "code": _concept(catalog.LOINC, *panel),
                "effectiveDateTime": self._when(10),
                "issued": self._when(130),
                "result": [_ref(r) for r in results],
            }
        )
        self.p.out.append(report)

    def lipid_panel(self, active: list[_Chronic]) -> None:
        rng = self.rng
        high = self._has(catalog.HYPERLIPIDEMIA, active)
        results = [
            self._lab(
                catalog.CHOLESTEROL, round(_clamp(rng.gauss(235 if high else 185, 25), 110, 350))
            ),
            self._lab(
                catalog.TRIGLYCERIDE, round(_clamp(rng.gauss(180 if high else 120, 40), 40, 600))
            ),
            self._lab(catalog.HDL, round(_clamp(rng.gauss(45 if high else 55, 10), 20, 100))),
            self._lab(catalog.LDL, round(_clamp(rng.gauss(155 if high else 105, 25), 40, 250))),
        ]
        self._report(catalog.LIPID_PANEL, results)

    def metabolic_panel(self, active: list[_Chronic]) -> None:
        rng = self.rng
        diabetic = self._has(catalog.DIABETES, active)
        results = [
            self._lab(
                catalog.GLUCOSE,
                round(_clamp(rng.gauss(150 if diabetic else 92, 30 if diabetic else 10), 55, 400)),
            ),
            self._lab(catalog.SODIUM, round(_clamp(rng.gauss(140, 2), 128, 150))),
            self._lab(catalog.POTASSIUM, round(_clamp(rng.gauss(4.2, 0.35), 3.0, 6.0), 1)),
            self._lab(catalog.CREATININE, round(_clamp(rng.gauss(0.95, 0.2), 0.4, 3.0), 2)),
            self._lab(catalog.UREA_N, round(_clamp(rng.gauss(14, 4), 5, 45))),
        ]
        self._report(catalog.BASIC_METABOLIC, results)

    def hba1c(self, active: list[_Chronic]) -> None:
        diabetic = self._has(catalog.DIABETES, active)
        value = self.rng.gauss(7.4, 1.0) if diabetic else self.rng.gauss(5.3, 0.3)
        self._lab(catalog.HBA1C, round(_clamp(value, 4.0, 14.0), 1))

    # --- orders ----------------------------------------------------------------------

    def prescribe(self, med: catalog.Med, reason: Resource, *, chronic: bool) -> None:
        horizon = 180 if chronic else 14
        request = self._base("MedicationRequest")
        request.update(
            {
                "status": "active" if self.day >= catalog.END - horizon else "completed",
                "intent": "order",
                "medicationCodeableConcept": _concept(catalog.RXNORM, med.code, med.display),
                "authoredOn": self._when(20),
                "reasonReference": [_ref(reason)],
                "dosageInstruction": [
                    {
                        "sequence": 1,
                        "text": med.dosage,
                        "timing": {
                            "repeat": {"frequency": med.per_day, "period": 1, "periodUnit": "d"}
                        },
                        "asNeededBoolean": med.as_needed,
                    }
                ],
            }
        )
        self.p.out.append(request)

    def procedure(self, code: catalog.Code, reason: Resource | None = None) -> None:
        resource = self._base("Procedure")
        resource.update(
            {
                "status": "completed",
                "code": _concept(catalog.SNOMED, *code),
                "performedDateTime": self._when(15),
            }
        )
        if reason is not None:
            resource["reasonReference"] = [_ref(reason)]
        self.p.out.append(resource)

    def immunize(self, vaccine: catalog.Code) -> None:
        resource = self._base("Immunization", "patient")
        resource.update(
            {
                "status": "completed",
                "vaccineCode": _concept(catalog.CVX, *vaccine),
                "occurrenceDateTime": self._when(25),
                "primarySource": True,
            }
        )
        self.p.out.append(resource)

    # --- visit kinds -----------------------------------------------------------------

    def checkup(self, active: list[_Chronic]) -> None:
        rng, p = self.rng, self.p
        age = p.age(self.day)
        self.vitals(active, full=True)
        if rng.random() < 0.5:
            self.lipid_panel(active)
        if rng.random() < 0.4:
            self.metabolic_panel(active)
        if rng.random() < 0.2:
            self.hba1c(active)
        medicated = [c for c in active if c.regimen]
        for condition in medicated:
            if rng.random() < 0.5:
                for med in condition.regimen:
                    self.prescribe(med, condition.resource, chronic=True)
        if medicated and rng.random() < 0.5:
            self.procedure(catalog.MED_RECONCILIATION)
        if rng.random() < 0.3:
            self.procedure(catalog.DEPRESSION_SCREENING)
        if age >= 45 and rng.random() < 0.05:
            self.procedure(catalog.COLONOSCOPY)
        if p.sex == "female" and age >= 40 and rng.random() < 0.3:
            self.procedure(catalog.MAMMOGRAPHY)
        if rng.random() < 0.6:
            self.immunize(catalog.FLU)
        if rng.random() < 0.1:
            self.immunize(catalog.TDAP if self.day >= catalog.TDAP_FROM else catalog.TD)
        self._once(catalog.PPSV23, age >= 65, 0.3)
        self._once(catalog.ZOSTER, age >= 50 and self.day >= catalog.ZOSTER_FROM, 0.2)
        if self.day >= catalog.COVID_FROM and rng.random() < 0.3:
            self.immunize(catalog.COVID)

    def _once(self, vaccine: catalog.Code, eligible: bool, chance: float) -> None:
        # Draw even when ineligible so later draws do not shift with eligibility.
        lucky = self.rng.random() < chance
        if eligible and lucky and vaccine[0] not in self.p.given_once:
            self.p.given_once.add(vaccine[0])
            self.immunize(vaccine)

    def follow_up(self, reason: _Chronic, active: list[_Chronic]) -> None:
        rng = self.rng
        self.vitals(active, full=False)
        disease = reason.disease
        if disease is catalog.DIABETES:
            self.hba1c(active)
            self._lab(catalog.GLUCOSE, round(_clamp(rng.gauss(150, 30), 55, 400)))
        elif disease is catalog.HYPERTENSION and rng.random() < 0.5:
            self.metabolic_panel(active)
        elif disease is catalog.HYPERLIPIDEMIA and rng.random() < 0.6:
            self.lipid_panel(active)
        elif disease in (catalog.ASTHMA, catalog.COPD) and rng.random() < 0.4:
            self.procedure(catalog.SPIROMETRY, reason.resource)
        for condition in active:
            if condition.regimen and (condition is reason or rng.random() < 0.3):
                for med in condition.regimen:
                    self.prescribe(med, condition.resource, chronic=True)

    def symptom(self) -> None:
        rng, p = self.rng, self.p
        code, med, test = rng.choice(catalog.ACUTE)
        active = [c for c in p.chronic if c.onset <= self.day]
        self.vitals(active, full=True, fever=rng.random() < 0.5)
        condition = p.condition(
            code,
            self.day,
            self.start + 600,
            encounter=self.encounter,
            resolved_day=self.day + rng.randint(7, 21),
        )
        if test is not None:
            self.procedure(test, condition)
        if med.penicillin and p.penicillin_allergy:
            med = catalog.ACETAMINOPHEN
        self.prescribe(med, condition, chronic=False)
