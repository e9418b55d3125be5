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
  :data:`MRN_SYSTEM`, an OID in HL7's arc reserved for examples
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
from typing import Any, Final, TypeAlias

from medledger.core.errors import InvalidInput

__all__ = [
    "CVX",
    "LOINC",
    "MRN_SYSTEM",
    "RXNORM",
    "SNOMED",
    "UCUM",
    "PatientBundle",
    "Resource",
    "all_resource_types",
    "generate_patient",
    "generate_patients",
    "iter_patients",
]

#: A FHIR resource as its JSON object.
Resource: TypeAlias = dict[str, Any]

LOINC: Final = "http://loinc.org"
SNOMED: Final = "http://snomed.info/sct"
RXNORM: Final = "http://www.nlm.nih.gov/research/umls/rxnorm"
CVX: Final = "http://hl7.org/fhir/sid/cvx"
UCUM: Final = "http://unitsofmeasure.org"
#: Identifier system of the fictional hospital's medical record numbers.
#: 2.16.840.1.113883.19 is the OID arc HL7 reserves for examples (unlike
#: 2.16.840.1.113883.4.1, which is the real US Social Security number system).
MRN_SYSTEM: Final = "urn:oid:2.16.840.1.113883.19.5.1"
HOSPITAL: Final = "Good Health Clinic (fictional)"

_OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_COND_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
_COND_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
_COND_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
_ALLERGY_CLINICAL = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
_ALLERGY_VERIFICATION = "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification"
_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
_V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
_V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"

_RESOURCE_TYPES: Final = (
    "Patient",
    "Encounter",
    "Observation",
    "Condition",
    "MedicationRequest",
    "AllergyIntolerance",
    "Immunization",
    "Procedure",
    "DiagnosticReport",
)

# --- dates (proleptic Gregorian ordinals) ------------------------------------------
_BIRTH_FIRST = date(1930, 1, 1).toordinal()
_BIRTH_LAST = date(2005, 12, 31).toordinal()
_CARE_FIRST = date(2000, 1, 1).toordinal()
_END = date(2025, 6, 30).toordinal()
_ADULT_DAYS = 6575  # 18 years
_TDAP_FROM = date(2006, 1, 1).toordinal()
_ZOSTER_FROM = date(2018, 1, 1).toordinal()
_COVID_FROM = date(2021, 1, 1).toordinal()
_DAY = 86_400

# --- vocabularies --------------------------------------------------------------------
_FAMILY = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis",
    "Rodriguez", "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson",
    "Thomas", "Taylor", "Moore", "Jackson", "Martin", "Lee", "Perez", "Thompson", "White",
    "Harris", "Sanchez", "Clark", "Ramirez", "Lewis", "Robinson", "Walker", "Young",
    "Allen", "King", "Wright", "Scott", "Torres", "Nguyen", "Hill", "Flores", "Green",
    "Adams", "Nelson", "Baker", "Hall", "Rivera", "Campbell", "Mitchell", "Carter", "Roberts",
)  # fmt: skip
_GIVEN_MALE = (
    "James", "Robert", "John", "Michael", "David", "William", "Richard", "Joseph", "Thomas",
    "Charles", "Christopher", "Daniel", "Matthew", "Anthony", "Mark", "Donald", "Steven",
    "Paul", "Andrew", "Joshua", "Kevin", "Brian", "George", "Edward", "Ronald",
)  # fmt: skip
_GIVEN_FEMALE = (
    "Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Jessica",
    "Sarah", "Karen", "Lisa", "Nancy", "Betty", "Margaret", "Sandra", "Ashley", "Kimberly",
    "Emily", "Donna", "Michelle", "Carol", "Amanda", "Dorothy", "Melissa", "Deborah",
)  # fmt: skip
_GIVEN_ANY = _GIVEN_MALE + _GIVEN_FEMALE
_STREETS = (
    "Oak", "Maple", "Cedar", "Pine", "Elm", "Willow", "Birch", "Lake", "Hill", "Park",
    "Meadow", "River", "Spring", "Sunset", "Highland", "Chestnut", "Walnut", "Forest",
)  # fmt: skip
_STREET_KINDS = ("Street", "Avenue", "Lane", "Road", "Drive", "Court", "Way")
_CITIES = (
    "Amberfield", "Brightwater Falls", "Cedar Hollow", "Eastbrook Landing", "Fernvale",
    "Glenmoor", "Ironwood Bay", "Juniper Flats", "Kestrel Point", "Larkspur Heights",
    "Millbrook Crossing", "Northwind", "Oakmere", "Pinecrest Valley", "Quillfield",
    "Ravenford", "Silverlake Junction", "Thornbury Vale", "Willowmere", "Zephyr Glen",
)  # fmt: skip

_Code: TypeAlias = tuple[str, str]  # (code, display)


@dataclass(frozen=True, slots=True)
class _Med:
    code: str
    display: str
    dosage: str
    per_day: int
    as_needed: bool
    penicillin: bool = False


_LISINOPRIL = _Med(
    "314076", "lisinopril 10 MG Oral Tablet", "Take 1 tablet by mouth once daily", 1, False
)
_AMLODIPINE = _Med(
    "197361", "amlodipine 5 MG Oral Tablet", "Take 1 tablet by mouth once daily", 1, False
)
_HCTZ = _Med(
    "310798",
    "hydrochlorothiazide 25 MG Oral Tablet",
    "Take 1 tablet by mouth every morning",
    1,
    False,
)
_METFORMIN = _Med(
    "860975",
    "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet",
    "Take 1 tablet by mouth with the evening meal",
    1,
    False,
)
_SIMVASTATIN = _Med(
    "312961", "simvastatin 20 MG Oral Tablet", "Take 1 tablet by mouth at bedtime", 1, False
)
_ATORVASTATIN = _Med(
    "259255", "atorvastatin 80 MG Oral Tablet", "Take 1 tablet by mouth once daily", 1, False
)
_ALBUTEROL = _Med(
    "745679",
    "200 ACTUAT albuterol 0.09 MG/ACTUAT Metered Dose Inhaler",
    "Inhale 2 puffs every 4 to 6 hours as needed for wheezing",
    4,
    True,
)
_FLUTICASONE = _Med(
    "895994",
    "120 ACTUAT fluticasone propionate 0.044 MG/ACTUAT Metered Dose Inhaler",
    "Inhale 2 puffs twice daily",
    2,
    False,
)
_ACETAMINOPHEN = _Med(
    "313782",
    "acetaminophen 325 MG Oral Tablet",
    "Take 2 tablets by mouth every 6 hours as needed for pain",
    4,
    True,
)
_IBUPROFEN = _Med(
    "310965",
    "ibuprofen 200 MG Oral Tablet",
    "Take 1 tablet by mouth every 6 hours as needed for pain",
    4,
    True,
)
_AMOXICILLIN = _Med(
    "308182",
    "amoxicillin 250 MG Oral Capsule",
    "Take 2 capsules by mouth three times daily for 10 days",
    3,
    False,
    True,
)
_PENICILLIN_V = _Med(
    "834061",
    "penicillin V potassium 250 MG Oral Tablet",
    "Take 2 tablets by mouth twice daily for 10 days",
    2,
    False,
    True,
)


@dataclass(frozen=True, slots=True)
class _Disease:
    code: str
    display: str
    prevalence: float
    min_age: int
    #: Alternative treatments; a patient gets one of them for life.
    regimens: tuple[tuple[_Med, ...], ...]


_HYPERTENSION = _Disease(
    "38341003",
    "Hypertensive disorder, systemic arterial (disorder)",
    0.30,
    18,
    ((_LISINOPRIL,), (_AMLODIPINE,), (_HCTZ,)),
)
_DIABETES = _Disease("44054006", "Diabetes mellitus type 2 (disorder)", 0.10, 18, ((_METFORMIN,),))
_HYPERLIPIDEMIA = _Disease(
    "55822004", "Hyperlipidemia (disorder)", 0.25, 18, ((_SIMVASTATIN,), (_ATORVASTATIN,))
)
_ASTHMA = _Disease(
    "195967001", "Asthma (disorder)", 0.08, 18, ((_ALBUTEROL,), (_FLUTICASONE, _ALBUTEROL))
)
_COPD = _Disease(
    "13645005", "Chronic obstructive lung disease (disorder)", 0.05, 40, ((_ALBUTEROL,),)
)
_DEPRESSION = _Disease("35489007", "Depressive disorder (disorder)", 0.10, 18, ((),))
_OSTEOARTHRITIS = _Disease(
    "396275006", "Osteoarthritis (disorder)", 0.15, 40, ((_ACETAMINOPHEN,), (_IBUPROFEN,))
)
_OBESITY = _Disease("414916001", "Obesity (disorder)", 0.0, 18, ((),))  # by BMI, not by chance
_CHRONIC = (_HYPERTENSION, _DIABETES, _HYPERLIPIDEMIA, _ASTHMA, _COPD, _DEPRESSION, _OSTEOARTHRITIS)

# Acute problems seen at "encounter for symptom" visits: (condition, medication, procedure).
_ACUTE: tuple[tuple[_Code, _Med, _Code | None], ...] = (
    (("444814009", "Viral sinusitis (disorder)"), _ACETAMINOPHEN, None),
    (("75498004", "Acute bacterial sinusitis (disorder)"), _AMOXICILLIN, None),
    (("10509002", "Acute bronchitis (disorder)"), _ACETAMINOPHEN, None),
    (("195662009", "Acute viral pharyngitis (disorder)"), _IBUPROFEN, None),
    (
        ("43878008", "Streptococcal sore throat (disorder)"),
        _PENICILLIN_V,
        ("117015009", "Throat culture (procedure)"),
    ),
)

# (code, display, category); a reaction list per category.
_ALLERGIES: tuple[tuple[str, str, str], ...] = (
    ("91935009", "Allergy to peanuts (disorder)", "food"),
    ("300913006", "Shellfish allergy (disorder)", "food"),
    ("417532002", "Allergy to fish (disorder)", "food"),
    ("91930004", "Allergy to eggs (disorder)", "food"),
    ("418689008", "Allergy to grass pollen (disorder)", "environment"),
    ("232350006", "House dust mite allergy (disorder)", "environment"),
    ("232347008", "Dander (animal) allergy (disorder)", "environment"),
    ("419474003", "Allergy to mould (disorder)", "environment"),
    ("91936005", "Allergy to penicillin (disorder)", "medication"),
)
_PENICILLIN_ALLERGY = "91936005"
_ANAPHYLAXIS: _Code = ("39579001", "Anaphylaxis (disorder)")
_REACTIONS: dict[str, tuple[_Code, ...]] = {
    "food": (
        ("247472004", "Wheal (finding)"),
        ("271807003", "Eruption of skin (disorder)"),
        _ANAPHYLAXIS,
    ),
    "environment": (
        ("76067001", "Sneezing (finding)"),
        ("49727002", "Cough (finding)"),
        ("418290006", "Itching of skin (finding)"),
    ),
    "medication": (
        ("271807003", "Eruption of skin (disorder)"),
        ("247472004", "Wheal (finding)"),
        _ANAPHYLAXIS,
    ),
}

_CHECKUP: _Code = ("185349003", "Encounter for check up (procedure)")
_FOLLOW_UP: _Code = ("390906007", "Follow-up encounter (procedure)")
_SYMPTOM: _Code = ("185345009", "Encounter for symptom (procedure)")

_MED_RECONCILIATION: _Code = ("430193006", "Medication reconciliation (procedure)")
_DEPRESSION_SCREENING: _Code = ("171207006", "Depression screening (procedure)")
_COLONOSCOPY: _Code = ("73761001", "Colonoscopy (procedure)")
_MAMMOGRAPHY: _Code = ("71651007", "Mammography (procedure)")
_SPIROMETRY: _Code = ("23426006", "Measurement of respiratory function (procedure)")

_FLU: _Code = ("140", "Influenza, seasonal, injectable, preservative free")
_TD: _Code = ("113", "Td (adult) preservative free")
_TDAP: _Code = ("115", "Tdap")
_PPSV23: _Code = ("33", "pneumococcal polysaccharide vaccine, 23 valent")
_ZOSTER: _Code = ("187", "zoster vaccine recombinant")
_COVID: _Code = (
    "208",
    "SARS-COV-2 (COVID-19) vaccine, mRNA, spike protein, LNP, preservative free, 30 mcg/0.3mL dose",
)

# LOINC observations: (code, display, UCUM unit).
_HEART_RATE = ("8867-4", "Heart rate", "/min")
_RESP_RATE = ("9279-1", "Respiratory rate", "/min")
_BODY_TEMP = ("8310-5", "Body temperature", "Cel")
_SPO2 = ("2708-6", "Oxygen saturation in Arterial blood", "%")
_WEIGHT = ("29463-7", "Body weight", "kg")
_HEIGHT = ("8302-2", "Body height", "cm")
_BMI = ("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2")
_BP_PANEL: _Code = ("85354-9", "Blood pressure panel with all children optional")
_SYSTOLIC = ("8480-6", "Systolic blood pressure", "mm[Hg]")
_DIASTOLIC = ("8462-4", "Diastolic blood pressure", "mm[Hg]")
_GLUCOSE = ("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL")
_HBA1C = ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%")
_SODIUM = ("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L")
_POTASSIUM = ("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L")
_CREATININE = ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL")
_UREA_N = ("3094-0", "Urea nitrogen [Mass/volume] in Serum or Plasma", "mg/dL")
_CHOLESTEROL = ("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL")
_TRIGLYCERIDE = ("2571-8", "Triglyceride [Mass/volume] in Serum or Plasma", "mg/dL")
_HDL = ("2085-9", "Cholesterol in HDL [Mass/volume] in Serum or Plasma", "mg/dL")
_LDL = ("18262-6", "Cholesterol in LDL [Mass/volume] in Serum or Plasma by Direct assay", "mg/dL")
_LIPID_PANEL: _Code = ("57698-3", "Lipid panel with direct LDL - Serum or Plasma")
_BASIC_METABOLIC: _Code = ("51990-0", "Basic metabolic panel - Blood")


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
    return _RESOURCE_TYPES


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
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


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
    disease: _Disease
    onset: int
    regimen: tuple[_Med, ...]
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
            _GIVEN_MALE
            if self.sex == "male"
            else _GIVEN_FEMALE
            if self.sex == "female"
            else _GIVEN_ANY
        )
        given = [rng.choice(names)]
        if rng.random() < 0.5:
            given.append(rng.choice(names))
        self.birth = rng.randint(_BIRTH_FIRST, _BIRTH_LAST)
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
                    "type": _concept(_V2_0203, "MR", "Medical record number"),
                    "system": MRN_SYSTEM,
                    "value": f"MRN{self.index:08d}",
                    "assigner": {"display": HOSPITAL},
                }
            ],
            "active": True,
            "name": [{"use": "official", "family": rng.choice(_FAMILY), "given": given}],
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
                        f"{rng.randint(1, 9999)} {rng.choice(_STREETS)} {rng.choice(_STREET_KINDS)}"
                    ],
                    "city": rng.choice(_CITIES),
                    "postalCode": f"{rng.randrange(10000, 100000)}",
                    "country": "US",
                }
            ],
        }
        self.patient_ref = {"reference": f"Patient/{pid}"}

    def age(self, day: int) -> float:
        return (day - self.birth) / 365.2425

    def care_start(self) -> int:
        return max(self.birth + _ADULT_DAYS, _CARE_FIRST)

    def _chronic_conditions(self) -> None:
        rng = self.rng
        obese = self.weight_kg / (self.height_cm / 100) ** 2 >= 30
        for disease in (*_CHRONIC, _OBESITY):
            if disease is _OBESITY:
                chance = 1.0 if obese else 0.0
            elif disease is _DIABETES and obese:
                chance = 0.25
            else:
                chance = disease.prevalence
            if rng.random() >= chance:
                continue
            first = max(self.birth + round(disease.min_age * 365.2425), _BIRTH_FIRST)
            if first > _END:
                continue
            onset = rng.randint(first, _END)
            regimen = rng.choice(disease.regimens)
            resource = self.condition(
                (disease.code, disease.display), onset, rng.randrange(8 * 3600, 17 * 3600)
            )
            self.chronic.append(_Chronic(disease, onset, regimen, resource))

    def condition(
        self,
        code: _Code,
        day: int,
        second: int,
        *,
        encounter: Resource | None = None,
        resolved_day: int | None = None,
    ) -> Resource:
        when = _datetime(day, second)
        resolved = resolved_day is not None and resolved_day <= _END
        resource: Resource = {
            "resourceType": "Condition",
            "id": _new_id(self.rng),
            "clinicalStatus": _status(_COND_CLINICAL, "resolved" if resolved else "active"),
            "verificationStatus": _status(_COND_VERIFICATION, "confirmed"),
            "category": [
                _status(_COND_CATEGORY, "encounter-diagnosis" if encounter else "problem-list-item")
            ],
            "code": _concept(SNOMED, *code),
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
        for code, display, category in rng.sample(_ALLERGIES, count):
            reaction = rng.choice(_REACTIONS[category])
            severe = reaction is _ANAPHYLAXIS
            if code == _PENICILLIN_ALLERGY:
                self.penicillin_allergy = True
            day = rng.randint(self.care_start(), _END)
            self.out.append(
                {
                    "resourceType": "AllergyIntolerance",
                    "id": _new_id(rng),
                    "clinicalStatus": _status(_ALLERGY_CLINICAL, "active"),
                    "verificationStatus": _status(_ALLERGY_VERIFICATION, "confirmed"),
                    "type": "allergy",
                    "category": [category],
                    "criticality": "high" if severe else "low",
                    "code": _concept(SNOMED, code, display),
                    "patient": dict(self.patient_ref),
                    "recordedDate": _datetime(day, rng.randrange(8 * 3600, 17 * 3600)),
                    "reaction": [
                        {
                            "manifestation": [_concept(SNOMED, *reaction)],
                            "severity": "severe" if severe else rng.choice(("mild", "moderate")),
                        }
                    ],
                }
            )

    # --- encounters ------------------------------------------------------------------

    def _encounter(self) -> None:
        rng = self.rng
        day = rng.randint(self.care_start(), _END)
        start = rng.randrange(8 * 3600, 17 * 3600, 300)
        end = start + rng.choice((15, 20, 30, 45, 60)) * 60
        active = [c for c in self.chronic if c.onset <= day]
        r = rng.random()
        kind, reason = _CHECKUP, None
        if r < 0.2:
            kind = _SYMPTOM
        elif r < 0.55 and active:
            kind, reason = _FOLLOW_UP, rng.choice(active)
        encounter: Resource = {
            "resourceType": "Encounter",
            "id": _new_id(rng),
            "status": "finished",
            "class": {"system": _ACT_CODE, "code": "AMB", "display": "ambulatory"},
            "type": [_concept(SNOMED, *kind)],
            "subject": dict(self.patient_ref),
            "period": {"start": _datetime(day, start), "end": _datetime(day, end)},
        }
        if reason is not None:
            encounter["reasonReference"] = [_ref(reason.resource)]
        self.out.append(encounter)
        visit = _Visit(self, encounter, day, start)
        if kind is _SYMPTOM:
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
                    "coding": [{"system": _OBS_CATEGORY, "code": category, "display": label}],
                    "text": label,
                }
            ],
            "code": {
                "coding": [{"system": LOINC, "code": code, "display": display}],
                "text": display,
            },
            "subject": {"reference": self.subject},
            "encounter": {"reference": self.enc},
            "effectiveDateTime": when,
            "issued": when if vital else self._when(minutes + 120),
            "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
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

    def _has(self, disease: _Disease, active: list[_Chronic]) -> bool:
        return any(c.disease is disease for c in active)

    # --- vitals ----------------------------------------------------------------------

    def vitals(self, active: list[_Chronic], *, full: bool, fever: bool = False) -> None:
        rng, p = self.rng, self.p
        self._vital(_HEART_RATE, round(_clamp(rng.gauss(90 if fever else 72, 10), 45, 140)))
        hypertensive = self._has(_HYPERTENSION, active)
        systolic = round(_clamp(rng.gauss(142 if hypertensive else 118, 12), 90, 200))
        diastolic = round(_clamp(rng.gauss(88 if hypertensive else 76, 8), 50, systolic - 25))
        bp = self._base("Observation")
        when = self._when(5)
        bp.update(
            {
                "status": "final",
                "category": [_concept(_OBS_CATEGORY, "vital-signs", "Vital Signs")],
                "code": _concept(LOINC, *_BP_PANEL),
                "effectiveDateTime": when,
                "issued": when,
                "component": [
                    {
                        "code": _concept(LOINC, *_SYSTOLIC[:2]),
                        "valueQuantity": _quantity(systolic, _SYSTOLIC[2]),
                    },
                    {
                        "code": _concept(LOINC, *_DIASTOLIC[:2]),
                        "valueQuantity": _quantity(diastolic, _DIASTOLIC[2]),
                    },
                ],
            }
        )
        p.out.append(bp)
        temperature = rng.gauss(38.3, 0.5) if fever else rng.gauss(36.8, 0.25)
        self._vital(_BODY_TEMP, round(_clamp(temperature, 35.5, 40.5), 1))
        weight = round(_clamp(p.weight_kg + rng.gauss(0, 1.5), 40, 200), 1)
        self._vital(_WEIGHT, weight)
        if full:
            lungs = self._has(_COPD, active) or self._has(_ASTHMA, active)
            self._vital(_HEIGHT, p.height_cm)
            self._vital(_BMI, round(weight / (p.height_cm / 100) ** 2, 1))
            self._vital(_RESP_RATE, round(_clamp(rng.gauss(18 if lungs else 15, 2), 10, 30)))
            self._vital(_SPO2, round(_clamp(rng.gauss(94 if lungs else 98, 1.5), 85, 100)))

    # --- labs ------------------------------------------------------------------------

    def _report(self, panel: _Code, results: list[Resource]) -> None:
        report = self._base("DiagnosticReport")
        report.update(
            {
                "status": "final",
                "category": [_concept(_V2_0074, "LAB", "Laboratory")],
                "code": _concept(LOINC, *panel),
                "effectiveDateTime": self._when(10),
                "issued": self._when(130),
                "result": [_ref(r) for r in results],
            }
        )
        self.p.out.append(report)

    def lipid_panel(self, active: list[_Chronic]) -> None:
        rng = self.rng
        high = self._has(_HYPERLIPIDEMIA, active)
        results = [
            self._lab(_CHOLESTEROL, round(_clamp(rng.gauss(235 if high else 185, 25), 110, 350))),
            self._lab(_TRIGLYCERIDE, round(_clamp(rng.gauss(180 if high else 120, 40), 40, 600))),
            self._lab(_HDL, round(_clamp(rng.gauss(45 if high else 55, 10), 20, 100))),
            self._lab(_LDL, round(_clamp(rng.gauss(155 if high else 105, 25), 40, 250))),
        ]
        self._report(_LIPID_PANEL, results)

    def metabolic_panel(self, active: list[_Chronic]) -> None:
        rng = self.rng
        diabetic = self._has(_DIABETES, active)
        results = [
            self._lab(
                _GLUCOSE,
                round(_clamp(rng.gauss(150 if diabetic else 92, 30 if diabetic else 10), 55, 400)),
            ),
            self._lab(_SODIUM, round(_clamp(rng.gauss(140, 2), 128, 150))),
            self._lab(_POTASSIUM, round(_clamp(rng.gauss(4.2, 0.35), 3.0, 6.0), 1)),
            self._lab(_CREATININE, round(_clamp(rng.gauss(0.95, 0.2), 0.4, 3.0), 2)),
            self._lab(_UREA_N, round(_clamp(rng.gauss(14, 4), 5, 45))),
        ]
        self._report(_BASIC_METABOLIC, results)

    def hba1c(self, active: list[_Chronic]) -> None:
        diabetic = self._has(_DIABETES, active)
        value = self.rng.gauss(7.4, 1.0) if diabetic else self.rng.gauss(5.3, 0.3)
        self._lab(_HBA1C, round(_clamp(value, 4.0, 14.0), 1))

    # --- orders ----------------------------------------------------------------------

    def prescribe(self, med: _Med, reason: Resource, *, chronic: bool) -> None:
        horizon = 180 if chronic else 14
        request = self._base("MedicationRequest")
        request.update(
            {
                "status": "active" if self.day >= _END - horizon else "completed",
                "intent": "order",
                "medicationCodeableConcept": _concept(RXNORM, med.code, med.display),
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

    def procedure(self, code: _Code, reason: Resource | None = None) -> None:
        resource = self._base("Procedure")
        resource.update(
            {
                "status": "completed",
                "code": _concept(SNOMED, *code),
                "performedDateTime": self._when(15),
            }
        )
        if reason is not None:
            resource["reasonReference"] = [_ref(reason)]
        self.p.out.append(resource)

    def immunize(self, vaccine: _Code) -> None:
        resource = self._base("Immunization", "patient")
        resource.update(
            {
                "status": "completed",
                "vaccineCode": _concept(CVX, *vaccine),
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
            self.procedure(_MED_RECONCILIATION)
        if rng.random() < 0.3:
            self.procedure(_DEPRESSION_SCREENING)
        if age >= 45 and rng.random() < 0.05:
            self.procedure(_COLONOSCOPY)
        if p.sex == "female" and age >= 40 and rng.random() < 0.3:
            self.procedure(_MAMMOGRAPHY)
        if rng.random() < 0.6:
            self.immunize(_FLU)
        if rng.random() < 0.1:
            self.immunize(_TDAP if self.day >= _TDAP_FROM else _TD)
        self._once(_PPSV23, age >= 65, 0.3)
        self._once(_ZOSTER, age >= 50 and self.day >= _ZOSTER_FROM, 0.2)
        if self.day >= _COVID_FROM and rng.random() < 0.3:
            self.immunize(_COVID)

    def _once(self, vaccine: _Code, eligible: bool, chance: float) -> None:
        # Draw even when ineligible so later draws do not shift with eligibility.
        lucky = self.rng.random() < chance
        if eligible and lucky and vaccine[0] not in self.p.given_once:
            self.p.given_once.add(vaccine[0])
            self.immunize(vaccine)

    def follow_up(self, reason: _Chronic, active: list[_Chronic]) -> None:
        rng = self.rng
        self.vitals(active, full=False)
        disease = reason.disease
        if disease is _DIABETES:
            self.hba1c(active)
            self._lab(_GLUCOSE, round(_clamp(rng.gauss(150, 30), 55, 400)))
        elif disease is _HYPERTENSION and rng.random() < 0.5:
            self.metabolic_panel(active)
        elif disease is _HYPERLIPIDEMIA and rng.random() < 0.6:
            self.lipid_panel(active)
        elif disease in (_ASTHMA, _COPD) and rng.random() < 0.4:
            self.procedure(_SPIROMETRY, reason.resource)
        for condition in active:
            if condition.regimen and (condition is reason or rng.random() < 0.3):
                for med in condition.regimen:
                    self.prescribe(med, condition.resource, chronic=True)

    def symptom(self) -> None:
        rng, p = self.rng, self.p
        code, med, test = rng.choice(_ACUTE)
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
            med = _ACETAMINOPHEN
        self.prescribe(med, condition, chronic=False)
