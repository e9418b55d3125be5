"""FHIR JSON responses (``application/fhir+json``, decimals with their precision)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import Response

from medledger.services.fhir import FHIR_JSON, dump_resource

__all__ = ["fhir_response", "raw_fhir_response"]


def fhir_response(
    body: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(dump_resource(body), status_code=status, media_type=FHIR_JSON, headers=headers)


def raw_fhir_response(
    data: bytes, *, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """A resource exactly as stored."""
    return Response(data, status_code=status, media_type=FHIR_JSON, headers=headers)
