"""Formats of the FHIR API: JSON only, and a client told so (FHIR R4 §3.1.0.1.6, RFC 9110 §12).

medledger reads and writes FHIR JSON. A client asking for XML (``Accept:
application/fhir+xml`` or ``_format=xml``) gets 406, and a request body in
XML (or any other non-JSON media type) gets 415 — instead of a JSON answer it
would misparse, or a 400 that blames the content of a body never read.
"""

from __future__ import annotations

from fastapi import Request

from medledger.api.errors import NotAcceptable, UnsupportedMediaType

__all__ = ["JSON_PATCH", "check_formats", "is_json_media_type"]

JSON_PATCH = "application/json-patch+json"
#: ``_format`` values meaning JSON (FHIR R4 §3.1.0.1.6).
_JSON_FORMATS = frozenset({"json", "application/json", "application/fhir+json"})
_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


def is_json_media_type(media_type: str) -> bool:
    """``application/json``, ``application/fhir+json`` or any other ``…+json`` type."""
    kind = media_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (
        kind.startswith("application/") and kind.endswith("+json")
    )


def _accepts_json(accept: str) -> bool:
    """Whether an ``Accept`` header admits a JSON answer (a range with q > 0)."""
    for media_range in accept.split(","):
        kind, *params = (p.strip() for p in media_range.split(";"))
        if not kind:
            continue
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        kind = kind.lower()
        if quality > 0 and (kind in ("*/*", "application/*") or is_json_media_type(kind)):
            return True
    return False


def _is_search_form(request: Request, content_type: str) -> bool:
    """``POST [type]/_search`` takes its parameters as a form (FHIR R4 §3.1.0.8.1)."""
    kind = content_type.split(";", 1)[0].strip().lower()
    return (
        request.method == "POST"
        and request.url.path.endswith("/_search")
        and kind == "application/x-www-form-urlencoded"
    )


async def check_formats(request: Request) -> None:
    """Refuse (406) a request whose answer must not be JSON, and (415) a non-JSON body."""
    # No query string, no ``_format``: the common read skips parsing one.
    formats = request.query_params.getlist("_format") if request.scope.get("query_string") else []
    if any(f.strip().lower() not in _JSON_FORMATS for f in formats):
        raise NotAcceptable("only FHIR JSON is served (_format=json or application/fhir+json)")
    accept = request.headers.get("accept")
    if accept is not None and accept.strip() and not formats and not _accepts_json(accept):
        raise NotAcceptable("only FHIR JSON is served: Accept must admit application/fhir+json")
    if request.method not in _METHODS_WITH_BODY:
        return  # no body, no content type to check (every read ends here)
    content_type = request.headers.get("content-type")
    if (
        content_type is not None
        and content_type.strip()
        and not is_json_media_type(content_type)
        and not _is_search_form(request, content_type)
    ):
        raise UnsupportedMediaType(
            "the request body must be FHIR JSON (application/fhir+json)"
            + (", or a JSON Patch" if request.method == "PATCH" else "")
        )
