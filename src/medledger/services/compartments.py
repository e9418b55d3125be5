"""The Patient compartment, from HL7's CompartmentDefinition (shipped as package data).

``Patient/$everything`` and ``Patient/$export`` rest on it: for each resource
type, the search parameters that put a resource of that type in a patient's
compartment (``Observation``: ``subject`` or ``performer`` names the patient).
Only parameters the search registry serves count: a compartment is found
through the blind index, the same way a search is.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

from medledger.services.search_registry import load_bundle, registry

__all__ = ["local_references", "patient_compartment"]


@functools.cache
def patient_compartment() -> Mapping[str, tuple[str, ...]]:
    """Each resource type that can be in a Patient's compartment -> its linking parameters.

    Types listed without parameters (never in a patient's compartment) are left
    out, and so is a parameter the registry does not serve for the type.
    """
    bundle = load_bundle("compartment.json")
    for entry in bundle.get("entry", []):
        definition = entry.get("resource") or {}
        if definition.get("resourceType") == "CompartmentDefinition" and (
            definition.get("code") == "Patient"
        ):
            out: dict[str, tuple[str, ...]] = {}
            for item in definition.get("resource", []):
                rtype = item.get("code")
                params = tuple(
                    p for p in item.get("param", []) if registry().get(str(rtype), p) is not None
                )
                if isinstance(rtype, str) and params:
                    out[rtype] = params
            return out
    raise LookupError("the shipped compartment.json has no Patient CompartmentDefinition")


def local_references(value: object) -> set[tuple[str, str]]:
    """Every ``(type, id)`` a resource refers to by a local literal reference (``Type/id``).

    Absolute URLs (another server's resources), contained (``#x``), conditional
    (``Type?x``) and versioned references' history part are not followed; ids
    that are no FHIR id are skipped.
    """
    found: set[tuple[str, str]] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("reference")
            if isinstance(ref, str) and "://" not in ref and "?" not in ref:
                parts = ref.split("/")
                if len(parts) == 4 and parts[2] == "_history":
                    parts = parts[:2]
                if len(parts) == 2 and _TYPE.fullmatch(parts[0]) and _ID.fullmatch(parts[1]):
                    found.add((parts[0], parts[1]))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
