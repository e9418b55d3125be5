"""Synthetic patients as FHIR R4 JSON for tests, the demo and the benchmarks: never real data.

Tooling, not product: no product layer imports it. The contract is in
:mod:`medledger.synthetic.patients` (the generator); :mod:`medledger.synthetic.catalog`
holds the codes, medications, diseases and names it draws from. The names below
are the public API.
"""

from medledger.synthetic.catalog import CVX, LOINC, MRN_SYSTEM, RXNORM, SNOMED, UCUM
from medledger.synthetic.patients import (
    PatientBundle,
    Resource,
    all_resource_types,
    generate_patient,
    generate_patients,
    iter_patients,
)

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
