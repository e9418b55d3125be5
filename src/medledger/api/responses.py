"""FHIR JSON responses (``application/fhir+json``, decimals with their precision)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import Response

from medledger.services.fhir import FHIR_JSON, dump_resource

__all__ = ["StoredResourceResponse", "fhir_response", "raw_fhir_response"]

_FHIR_JSON_HEADER = (b"content-type", FHIR_JSON.encode("latin-1"))


def fhir_response(
    body: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(dump_resource(body), status_code=status, media_type=FHIR_JSON, headers=headers)


def raw_fhir_response(
    data: bytes, *, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """A resource exactly as stored."""
    return Response(data, status_code=status, media_type=FHIR_JSON, headers=headers)


class StoredResourceResponse(Response):
    """200 with a stored resource's bytes and its version's headers (read and vread).

    Exactly ``raw_fhir_response(data, headers={"ETag": …, "Last-Modified": …,
    "Location": …})`` — the same status, body and raw header list, in that order
    (a test holds the two together) — without Starlette's generic header
    building: every read answers with one.
    """

    media_type = FHIR_JSON

    def __init__(self, data: bytes, *, etag: str, last_modified: str, location: str) -> None:
        self.status_code = 200
        self.background = None
        self.body = data
        self.raw_headers = [
            (b"etag", etag.encode("latin-1")),
            (b"last-modified", last_modified.encode("latin-1")),
            (b"location", location.encode("latin-1")),
            (b"content-length", str(len(data)).encode("latin-1")),
            _FHIR_JSON_HEADER,
        ]
