"""The HTTP interface: FHIR R4 REST at /fhir, chain inspection at /chain (FastAPI)."""
