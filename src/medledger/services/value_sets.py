"""Required value-set bindings the ``fhir.resources`` models carry but do not enforce.

A FHIR ``code`` element is bound *required* to a short code list (R4 §4.1,
"required: to be conformant, the concept SHALL be from the specified value
set"). The R4B models record each list in the field's ``enum_values`` (from
the element's short description) but accept any string, so
``gender: "robot"`` would be stored. Two tables live here as data, beside
the few R4 core invariants the models do not check either
(:func:`invariant_violations`):

- :data:`COMPLETE_CODES`: lists the models cut short with a trailing ``+``
  (``Observation.status`` is ``registered | preliminary | final | amended +``),
  completed from the R4 (4.0.1) value sets. A cut-short list with no entry
  here is not enforced: refusing valid data on a guess is worse than
  accepting an unknown code.
- :data:`CONCEPT_BINDINGS`: ``CodeableConcept`` elements bound required to a
  code system (``Condition.clinicalStatus``): the models know nothing of these.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "COMPLETE_CODES",
    "CONCEPT_BINDINGS",
    "SEARCH_VALUE_SETS",
    "ConceptBinding",
    "invariant_violations",
    "required_codes",
]


def _codes(short: str) -> frozenset[str]:
    """The codes of a list written as FHIR writes it in an element's short text."""
    return frozenset(code.strip() for code in short.split("|"))


_OBSERVATION_STATUS = _codes(
    "registered | preliminary | final | amended | corrected | cancelled"
    " | entered-in-error | unknown"
)
_ENCOUNTER_STATUS = _codes(
    "planned | arrived | triaged | in-progress | onleave | finished"
    " | cancelled | entered-in-error | unknown"
)

#: ``(model class name, JSON property)`` -> every code of the R4 value set.
COMPLETE_CODES: dict[tuple[str, str], frozenset[str]] = {
    ("Observation", "status"): _OBSERVATION_STATUS,
    ("DetectedIssue", "status"): _OBSERVATION_STATUS,
    ("RiskAssessment", "status"): _OBSERVATION_STATUS,
    ("Encounter", "status"): _ENCOUNTER_STATUS,
    ("EncounterStatusHistory", "status"): _ENCOUNTER_STATUS,
    ("DiagnosticReport", "status"): _codes(
        "registered | partial | preliminary | final | amended | corrected"
        " | appended | cancelled | entered-in-error | unknown"
    ),
    ("DeviceUdiCarrier", "entryType"): _codes(
        "barcode | rfid | manual | card | self-reported | unknown"
    ),
    ("DeviceUseStatement", "status"): _codes(
        "active | completed | entered-in-error | intended | stopped | on-hold"
    ),
    ("SupplyRequest", "status"): _codes(
        "draft | active | suspended | cancelled | completed | entered-in-error | unknown"
    ),
    ("Task", "status"): _codes(
        "draft | requested | received | accepted | rejected | ready | cancelled"
        " | in-progress | on-hold | failed | completed | entered-in-error"
    ),
    ("QuestionnaireItem", "type"): _codes(
        "group | display | question | boolean | decimal | integer | date"
        " | dateTime | time | string | text | url | choice | open-choice"
        " | attachment | reference | quantity"
    ),
}


def required_codes(model_name: str, prop: str, enum_values: Any) -> frozenset[str] | None:
    """The codes a ``code`` property may hold, or ``None`` when it is not enforced.

    ``enum_values`` is what the model declares for the property (a list, or
    nothing for an unbound element).
    """
    if not isinstance(enum_values, list) or not enum_values:
        return None
    if "+" in enum_values:
        return COMPLETE_CODES.get((model_name, prop))
    return frozenset(str(v) for v in enum_values)


ConceptBinding = tuple[str, frozenset[str]]

_CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
_CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
_ALLERGY_CLINICAL = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
_ALLERGY_VERIFICATION = "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification"

#: ``(resource type, JSON property)`` -> (code system, its codes) of a required
#: ``CodeableConcept`` binding: a coding of that system with one of those codes
#: must be present, and no coding of that system may carry another code.
CONCEPT_BINDINGS: dict[tuple[str, str], ConceptBinding] = {
    ("Condition", "clinicalStatus"): (
        _CONDITION_CLINICAL,
        _codes("active | recurrence | relapse | inactive | remission | resolved"),
    ),
    ("Condition", "verificationStatus"): (
        _CONDITION_VERIFICATION,
        _codes("unconfirmed | provisional | differential | confirmed | refuted | entered-in-error"),
    ),
    ("AllergyIntolerance", "clinicalStatus"): (
        _ALLERGY_CLINICAL,
        _codes("active | inactive | resolved"),
    ),
    ("AllergyIntolerance", "verificationStatus"): (
        _ALLERGY_VERIFICATION,
        _codes("unconfirmed | confirmed | refuted | entered-in-error"),
    ),
}


#: The value sets a token search may name with ``:in`` / ``:not-in`` (the node's own
#: code lists above): canonical URL -> (code system, its codes).
SEARCH_VALUE_SETS: dict[str, tuple[str, frozenset[str]]] = {
    "http://hl7.org/fhir/ValueSet/administrative-gender": (
        "http://hl7.org/fhir/administrative-gender",
        _codes("male | female | other | unknown"),
    ),
    "http://hl7.org/fhir/ValueSet/observation-status": (
        "http://hl7.org/fhir/observation-status",
        _OBSERVATION_STATUS,
    ),
    "http://hl7.org/fhir/ValueSet/encounter-status": (
        "http://hl7.org/fhir/encounter-status",
        _ENCOUNTER_STATUS,
    ),
    "http://hl7.org/fhir/ValueSet/diagnostic-report-status": (
        "http://hl7.org/fhir/diagnostic-report-status",
        COMPLETE_CODES[("DiagnosticReport", "status")],
    ),
    **{
        f"http://hl7.org/fhir/ValueSet/{system.rsplit('/', 1)[-1]}": (system, codes)
        for system, codes in CONCEPT_BINDINGS.values()
    },
}


# -- core invariants the models do not check ---------------------------------------------


def _has_code(concept: Any, system: str, codes: frozenset[str]) -> bool:
    codings = concept.get("coding") if isinstance(concept, dict) else None
    return any(
        isinstance(c, dict) and c.get("system") == system and c.get("code") in codes
        for c in (codings if isinstance(codings, list) else [])
    )


_ERROR = frozenset({"entered-in-error"})
_ABATED = frozenset({"inactive", "remission", "resolved"})


def invariant_violations(resource: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The R4 core invariants ``resource`` breaks, as ``(key, expression, human text)``.

    Only invariants of the resource itself, written from the R4 definitions:
    Condition con-4 and con-5, AllergyIntolerance ait-1 and ait-2, Observation
    obs-6, Patient pat-1.
    """
    rtype = resource.get("resourceType")
    found: list[tuple[str, str, str]] = []
    if rtype == "Condition":
        erroneous = _has_code(resource.get("verificationStatus"), _CONDITION_VERIFICATION, _ERROR)
        if erroneous and "clinicalStatus" in resource:
            found.append(
                (
                    "con-5",
                    "Condition.clinicalStatus",
                    "clinicalStatus SHALL NOT be present if verificationStatus is entered-in-error",
                )
            )
        abated = any(k.startswith("abatement") for k in resource)
        if (
            abated
            and not erroneous
            and not _has_code(resource.get("clinicalStatus"), _CONDITION_CLINICAL, _ABATED)
        ):
            found.append(
                (
                    "con-4",
                    "Condition.clinicalStatus",
                    "an abated condition's clinicalStatus must be inactive, resolved or remission",
                )
            )
    elif rtype == "AllergyIntolerance":
        erroneous = _has_code(resource.get("verificationStatus"), _ALLERGY_VERIFICATION, _ERROR)
        if erroneous and "clinicalStatus" in resource:
            found.append(
                (
                    "ait-1",
                    "AllergyIntolerance.clinicalStatus",
                    "clinicalStatus SHALL be absent if verificationStatus is entered-in-error",
                )
            )
        if not erroneous and "clinicalStatus" not in resource:
            found.append(
                (
                    "ait-2",
                    "AllergyIntolerance.clinicalStatus",
                    "clinicalStatus SHALL be present unless verificationStatus is entered-in-error",
                )
            )
    elif rtype == "Observation":
        if "dataAbsentReason" in resource and any(k.startswith("value") for k in resource):
            found.append(
                (
                    "obs-6",
                    "Observation.dataAbsentReason",
                    "dataAbsentReason SHALL only be present if value[x] is not",
                )
            )
    elif rtype == "Patient":
        contacts = resource.get("contact")
        for i, contact in enumerate(contacts if isinstance(contacts, list) else []):
            if isinstance(contact, dict) and not any(
                k in contact for k in ("name", "telecom", "address", "organization")
            ):
                found.append(
                    (
                        "pat-1",
                        f"Patient.contact[{i}]",
                        "a contact SHALL have a name, telecom, address or organization",
                    )
                )
    return found
