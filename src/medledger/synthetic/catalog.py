"""What the synthetic generator draws from: code systems, real clinical codes, fictional names.

Constants only, no logic: the code-system URIs, the LOINC, SNOMED CT, RxNorm
and CVX codes with their displays, medications and the chronic diseases they
treat (with prevalence), acute problems, allergies and their reactions, the
fictional names, streets and cities, and the dates care happens between (as
proleptic Gregorian ordinals). :mod:`medledger.synthetic.patients` turns them
into patients.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Final, TypeAlias

__all__ = [
    "ACETAMINOPHEN",
    "ACT_CODE",
    "ACUTE",
    "ADULT_DAYS",
    "ALBUTEROL",
    "ALLERGIES",
    "ALLERGY_CLINICAL",
    "ALLERGY_VERIFICATION",
    "AMLODIPINE",
    "AMOXICILLIN",
    "ANAPHYLAXIS",
    "ASTHMA",
    "ATORVASTATIN",
    "BASIC_METABOLIC",
    "BIRTH_FIRST",
    "BIRTH_LAST",
    "BMI",
    "BODY_TEMP",
    "BP_PANEL",
    "CARE_FIRST",
    "CHECKUP",
    "CHOLESTEROL",
    "CHRONIC",
    "CITIES",
    "COLONOSCOPY",
    "COND_CATEGORY",
    "COND_CLINICAL",
    "COND_VERIFICATION",
    "COPD",
    "COVID",
    "COVID_FROM",
    "CREATININE",
    "CVX",
    "Code",
    "DAY",
    "DEPRESSION",
    "DEPRESSION_SCREENING",
    "DIABETES",
    "DIASTOLIC",
    "Disease",
    "END",
    "FAMILY",
    "FLU",
    "FLUTICASONE",
    "FOLLOW_UP",
    "GIVEN_ANY",
    "GIVEN_FEMALE",
    "GIVEN_MALE",
    "GLUCOSE",
    "HBA1C",
    "HCTZ",
    "HDL",
    "HEART_RATE",
    "HEIGHT",
    "HOSPITAL",
    "HYPERLIPIDEMIA",
    "HYPERTENSION",
    "IBUPROFEN",
    "LDL",
    "LIPID_PANEL",
    "LISINOPRIL",
    "LOINC",
    "MAMMOGRAPHY",
    "MED_RECONCILIATION",
    "METFORMIN",
    "MRN_SYSTEM",
    "Med",
    "OBESITY",
    "OBS_CATEGORY",
    "OSTEOARTHRITIS",
    "PENICILLIN_ALLERGY",
    "PENICILLIN_V",
    "POTASSIUM",
    "PPSV23",
    "REACTIONS",
    "RESOURCE_TYPES",
    "RESP_RATE",
    "RXNORM",
    "SIMVASTATIN",
    "SNOMED",
    "SODIUM",
    "SPIROMETRY",
    "SPO2",
    "STREETS",
    "STREET_KINDS",
    "SYMPTOM",
    "SYSTOLIC",
    "TD",
    "TDAP",
    "TDAP_FROM",
    "TRIGLYCERIDE",
    "UCUM",
    "UREA_N",
    "V2_0074",
    "V2_0203",
    "WEIGHT",
    "ZOSTER",
    "ZOSTER_FROM",
]

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

OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
COND_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
COND_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
COND_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
ALLERGY_CLINICAL = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
ALLERGY_VERIFICATION = "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"

RESOURCE_TYPES: Final = (
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
BIRTH_FIRST = date(1930, 1, 1).toordinal()
BIRTH_LAST = date(2005, 12, 31).toordinal()
CARE_FIRST = date(2000, 1, 1).toordinal()
END = date(2025, 6, 30).toordinal()
ADULT_DAYS = 6575  # 18 years
TDAP_FROM = date(2006, 1, 1).toordinal()
ZOSTER_FROM = date(2018, 1, 1).toordinal()
COVID_FROM = date(2021, 1, 1).toordinal()
DAY = 86_400

# --- vocabularies --------------------------------------------------------------------
FAMILY = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis",
    "Rodriguez", "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson",
    "Thomas", "Taylor", "Moore", "Jackson", "Martin", "Lee", "Perez", "Thompson", "White",
    "Harris", "Sanchez", "Clark", "Ramirez", "Lewis", "Robinson", "Walker", "Young",
    "Allen", "King", "Wright", "Scott", "Torres", "Nguyen", "Hill", "Flores", "Green",
    "Adams", "Nelson", "Baker", "Hall", "Rivera", "Campbell", "Mitchell", "Carter", "Roberts",
)  # fmt: skip
GIVEN_MALE = (
    "James", "Robert", "John", "Michael", "David", "William", "Richard", "Joseph", "Thomas",
    "Charles", "Christopher", "Daniel", "Matthew", "Anthony", "Mark", "Donald", "Steven",
    "Paul", "Andrew", "Joshua", "Kevin", "Brian", "George", "Edward", "Ronald",
)  # fmt: skip
GIVEN_FEMALE = (
    "Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Jessica",
    "Sarah", "Karen", "Lisa", "Nancy", "Betty", "Margaret", "Sandra", "Ashley", "Kimberly",
    "Emily", "Donna", "Michelle", "Carol", "Amanda", "Dorothy", "Melissa", "Deborah",
)  # fmt: skip
GIVEN_ANY = GIVEN_MALE + GIVEN_FEMALE
STREETS = (
    "Oak", "Maple", "Cedar", "Pine", "Elm", "Willow", "Birch", "Lake", "Hill", "Park",
    "Meadow", "River", "Spring", "Sunset", "Highland", "Chestnut", "Walnut", "Forest",
)  # fmt: skip
STREET_KINDS = ("Street", "Avenue", "Lane", "Road", "Drive", "Court", "Way")
CITIES = (
    "Amberfield", "Brightwater Falls", "Cedar Hollow", "Eastbrook Landing", "Fernvale",
    "Glenmoor", "Ironwood Bay", "Juniper Flats", "Kestrel Point", "Larkspur Heights",
    "Millbrook Crossing", "Northwind", "Oakmere", "Pinecrest Valley", "Quillfield",
    "Ravenford", "Silverlake Junction", "Thornbury Vale", "Willowmere", "Zephyr Glen",
)  # fmt: skip

Code: TypeAlias = tuple[str, str]  # (code, display)


@dataclass(frozen=True, slots=True)
class Med:
    code: str
    display: str
    dosage: str
    per_day: int
    as_needed: bool
    penicillin: bool = False


LISINOPRIL = Med(
    "314076", "lisinopril 10 MG Oral Tablet", "Take 1 tablet by mouth once daily", 1, False
)
AMLODIPINE = Med(
    "197361", "amlodipine 5 MG Oral Tablet", "Take 1 tablet by mouth once daily", 1, False
)
HCTZ = Med(
    "310798",
    "hydrochlorothiazide 25 MG Oral Tablet",
    "Take 1 tablet by mouth every morning",
    1,
    False,
)
METFORMIN = Med(
    "860975",
    "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet",
    "Take 1 tablet by mouth with the evening meal",
    1,
    False,
)
SIMVASTATIN = Med(
    "312961", "simvastatin 20 MG Oral Tablet", "Take 1 tablet by mouth at bedtime", 1, False
)
ATORVASTATIN = Med(
    "259255", "atorvastatin 80 MG Oral Tablet", "Take 1 tablet by mouth once daily", 1, False
)
ALBUTEROL = Med(
    "745679",
    "200 ACTUAT albuterol 0.09 MG/ACTUAT Metered Dose Inhaler",
    "Inhale 2 puffs every 4 to 6 hours as needed for wheezing",
    4,
    True,
)
FLUTICASONE = Med(
    "895994",
    "120 ACTUAT fluticasone propionate 0.044 MG/ACTUAT Metered Dose Inhaler",
    "Inhale 2 puffs twice daily",
    2,
    False,
)
ACETAMINOPHEN = Med(
    "313782",
    "acetaminophen 325 MG Oral Tablet",
    "Take 2 tablets by mouth every 6 hours as needed for pain",
    4,
    True,
)
IBUPROFEN = Med(
    "310965",
    "ibuprofen 200 MG Oral Tablet",
    "Take 1 tablet by mouth every 6 hours as needed for pain",
    4,
    True,
)
AMOXICILLIN = Med(
    "308182",
    "amoxicillin 250 MG Oral Capsule",
    "Take 2 capsules by mouth three times daily for 10 days",
    3,
    False,
    True,
)
PENICILLIN_V = Med(
    "834061",
    "penicillin V potassium 250 MG Oral Tablet",
    "Take 2 tablets by mouth twice daily for 10 days",
    2,
    False,
    True,
)


@dataclass(frozen=True, slots=True)
class Disease:
    code: str
    display: str
    prevalence: float
    min_age: int
    #: Alternative treatments; a patient gets one of them for life.
    regimens: tuple[tuple[Med, ...], ...]


HYPERTENSION = Disease(
    "38341003",
    "Hypertensive disorder, systemic arterial (disorder)",
    0.30,
    18,
    ((LISINOPRIL,), (AMLODIPINE,), (HCTZ,)),
)
DIABETES = Disease("44054006", "Diabetes mellitus type 2 (disorder)", 0.10, 18, ((METFORMIN,),))
HYPERLIPIDEMIA = Disease(
    "55822004", "Hyperlipidemia (disorder)", 0.25, 18, ((SIMVASTATIN,), (ATORVASTATIN,))
)
ASTHMA = Disease(
    "195967001", "Asthma (disorder)", 0.08, 18, ((ALBUTEROL,), (FLUTICASONE, ALBUTEROL))
)
COPD = Disease("13645005", "Chronic obstructive lung disease (disorder)", 0.05, 40, ((ALBUTEROL,),))
DEPRESSION = Disease("35489007", "Depressive disorder (disorder)", 0.10, 18, ((),))
OSTEOARTHRITIS = Disease(
    "396275006", "Osteoarthritis (disorder)", 0.15, 40, ((ACETAMINOPHEN,), (IBUPROFEN,))
)
OBESITY = Disease("414916001", "Obesity (disorder)", 0.0, 18, ((),))  # by BMI, not by chance
CHRONIC = (HYPERTENSION, DIABETES, HYPERLIPIDEMIA, ASTHMA, COPD, DEPRESSION, OSTEOARTHRITIS)

# Acute problems seen at "encounter for symptom" visits: (condition, medication, procedure).
ACUTE: tuple[tuple[Code, Med, Code | None], ...] = (
    (("444814009", "Viral sinusitis (disorder)"), ACETAMINOPHEN, None),
    (("75498004", "Acute bacterial sinusitis (disorder)"), AMOXICILLIN, None),
    (("10509002", "Acute bronchitis (disorder)"), ACETAMINOPHEN, None),
    (("195662009", "Acute viral pharyngitis (disorder)"), IBUPROFEN, None),
    (
        ("43878008", "Streptococcal sore throat (disorder)"),
        PENICILLIN_V,
        ("117015009", "Throat culture (procedure)"),
    ),
)

# (code, display, category); a reaction list per category.
ALLERGIES: tuple[tuple[str, str, str], ...] = (
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
PENICILLIN_ALLERGY = "91936005"
ANAPHYLAXIS: Code = ("39579001", "Anaphylaxis (disorder)")
REACTIONS: dict[str, tuple[Code, ...]] = {
    "food": (
        ("247472004", "Wheal (finding)"),
        ("271807003", "Eruption of skin (disorder)"),
        ANAPHYLAXIS,
    ),
    "environment": (
        ("76067001", "Sneezing (finding)"),
        ("49727002", "Cough (finding)"),
        ("418290006", "Itching of skin (finding)"),
    ),
    "medication": (
        ("271807003", "Eruption of skin (disorder)"),
        ("247472004", "Wheal (finding)"),
        ANAPHYLAXIS,
    ),
}

CHECKUP: Code = ("185349003", "Encounter for check up (procedure)")
FOLLOW_UP: Code = ("390906007", "Follow-up encounter (procedure)")
SYMPTOM: Code = ("185345009", "Encounter for symptom (procedure)")

MED_RECONCILIATION: Code = ("430193006", "Medication reconciliation (procedure)")
DEPRESSION_SCREENING: Code = ("171207006", "Depression screening (procedure)")
COLONOSCOPY: Code = ("73761001", "Colonoscopy (procedure)")
MAMMOGRAPHY: Code = ("71651007", "Mammography (procedure)")
SPIROMETRY: Code = ("23426006", "Measurement of respiratory function (procedure)")

FLU: Code = ("140", "Influenza, seasonal, injectable, preservative free")
TD: Code = ("113", "Td (adult) preservative free")
TDAP: Code = ("115", "Tdap")
PPSV23: Code = ("33", "pneumococcal polysaccharide vaccine, 23 valent")
ZOSTER: Code = ("187", "zoster vaccine recombinant")
COVID: Code = (
    "208",
    "SARS-COV-2 (COVID-19) vaccine, mRNA, spike protein, LNP, preservative free, 30 mcg/0.3mL dose",
)

# LOINC observations: (code, display, UCUM unit).
HEART_RATE = ("8867-4", "Heart rate", "/min")
RESP_RATE = ("9279-1", "Respiratory rate", "/min")
BODY_TEMP = ("8310-5", "Body temperature", "Cel")
SPO2 = ("2708-6", "Oxygen saturation in Arterial blood", "%")
WEIGHT = ("29463-7", "Body weight", "kg")
HEIGHT = ("8302-2", "Body height", "cm")
BMI = ("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2")
BP_PANEL: Code = ("85354-9", "Blood pressure panel with all children optional")
SYSTOLIC = ("8480-6", "Systolic blood pressure", "mm[Hg]")
DIASTOLIC = ("8462-4", "Diastolic blood pressure", "mm[Hg]")
GLUCOSE = ("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL")
HBA1C = ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%")
SODIUM = ("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L")
POTASSIUM = ("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L")
CREATININE = ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL")
UREA_N = ("3094-0", "Urea nitrogen [Mass/volume] in Serum or Plasma", "mg/dL")
CHOLESTEROL = ("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL")
TRIGLYCERIDE = ("2571-8", "Triglyceride [Mass/volume] in Serum or Plasma", "mg/dL")
HDL = ("2085-9", "Cholesterol in HDL [Mass/volume] in Serum or Plasma", "mg/dL")
LDL = ("18262-6", "Cholesterol in LDL [Mass/volume] in Serum or Plasma by Direct assay", "mg/dL")
LIPID_PANEL: Code = ("57698-3", "Lipid panel with direct LDL - Serum or Plasma")
BASIC_METABOLIC: Code = ("51990-0", "Basic metabolic panel - Blood")
