"""The web portal: hand-written HTML, CSS and ES modules served by the node at ``/portal/``.

* ``GET /portal/<file>`` — a file of the package's ``portal_static``
  directory, and nothing else: the set of names is read once from the
  package, a request names one of them or gets 404 (no path is ever joined
  from request text). Each answer carries the API's security headers with a
  Content-Security-Policy of its own: scripts, styles, images and API calls
  from this origin only, no inline script or style, no frames, forms post
  only here.
* ``GET /portal/api/session`` — who the presented token speaks for (role,
  Patient id of a patient token, this node's institution and consortium):
  what the pages need to choose their view.
* ``GET /fhir/{type}/{id}/$provenance`` — a clinician's provenance badge of a
  local record (``SharingService.local_provenance``): which block of which
  chain, the anchor and its finality certificate, verified now. Hashes and
  heights only; the record's content is read (and audited) by the FHIR read.

The portal holds its bearer token in ``sessionStorage`` and sends it in the
``Authorization`` header: no cookie carries authority, so a cross-site form
cannot act with the user's credentials (docs/security.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import RedirectResponse, Response

from medledger.api.auth import require
from medledger.api.deps import NodeDep
from medledger.api.responses import fhir_response
from medledger.core.errors import InvalidInput, NotFound
from medledger.services.fhir import is_resource_type, validate_id
from medledger.storage.ports import TokenInfo

__all__ = ["PORTAL_CSP", "router"]

router = APIRouter(tags=["portal"])
AnyRole = Annotated[TokenInfo, Depends(require("clinician", "auditor", "patient"))]
Clinician = Annotated[TokenInfo, Depends(require("clinician"))]

#: The portal's Content-Security-Policy: everything from this origin only, nothing inline.
PORTAL_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; object-src 'none'; "
    "frame-ancestors 'none'"
)
_STATIC = Path(__file__).parent / "portal_static"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".json": "application/json",
}


@dataclass(frozen=True, slots=True)
class _File:
    body: bytes
    content_type: str


def _framed(page: Path, frame: Template) -> bytes:
    """A page as served: its own part (``page``, which begins with its ``<h1>`` line) in the
    frame every page shares (``page.tmpl``: head, header bar, status line, footer), with
    the heading as its title and its own module (``js/<name>.js``)."""
    heading_line, _, content = page.read_text(encoding="utf-8").partition("\n")
    heading = re.fullmatch(r"<h1>(.+)</h1>", heading_line)
    if heading is None:
        raise InvalidInput(f"{page.name}: a portal page begins with its <h1> line")
    return frame.substitute(heading=heading[1], name=page.stem, content=content).encode()


def _load_files(root: Path) -> dict[str, _File]:
    """Every servable file under ``root``, by its ``/``-separated relative name; the pages
    (``*.html``) in their frame."""
    frame = Template((root / "page.tmpl").read_text(encoding="utf-8"))
    files: dict[str, _File] = {}
    for path in sorted(root.rglob("*")):
        content_type = _TYPES.get(path.suffix)
        if path.is_file() and content_type is not None:
            body = _framed(path, frame) if path.suffix == ".html" else path.read_bytes()
            files[path.relative_to(root).as_posix()] = _File(body, content_type)
    return files


_FILES = _load_files(_STATIC)


def _headers(content_type: str) -> dict[str, str]:
    return {
        "Content-Type": content_type,
        "Content-Security-Policy": PORTAL_CSP,
        # The pages are public code; the data they show comes from API answers (no-store).
        "Cache-Control": "no-cache",
    }


@router.get("/portal/api/session", summary="who the presented token speaks for")
async def session(node: NodeDep, who: AnyRole) -> Response:
    body: dict[str, Any] = {
        "role": who.role,
        "patient": who.patient,
        "institution": node.config.institution,
        "consortium": node.consortium.chain_id if node.consortium is not None else None,
        # Member ids are public (the genesis file); a patient picks a grantee from them.
        "members": (
            [m.id for m in node.consortium.state.members.members]
            if node.consortium is not None
            else []
        ),
        "expires_ms": who.expires_ms,
    }
    return fhir_response(body, headers={"Content-Type": "application/json"})


@router.get(
    "/fhir/{resource_type}/{rid}/$provenance",
    summary="where a local record stands on the chains, verified now",
)
async def provenance(resource_type: str, rid: str, node: NodeDep, who: Clinician) -> Response:
    if not is_resource_type(resource_type):
        raise InvalidInput(f"{resource_type!r} is not a FHIR resource type")
    if node.sharing is None:
        raise NotFound("this node has not joined a consortium")
    body = await node.sharing.local_provenance(resource_type, validate_id(rid))
    return fhir_response(body, headers={"Content-Type": "application/json"})


@router.get("/portal", include_in_schema=False)
async def portal_root() -> Response:
    return RedirectResponse("/portal/", status_code=308)


#: Names served as another file: the sign-in service redirects back to /portal/callback
#: (the portal's registered redirect URI, decision 0039), which the sign-in page handles.
_ALIASES = {"": "index.html", "callback": "index.html"}


@router.get("/portal/{name:path}", include_in_schema=False)
async def portal_file(name: str) -> Response:
    found = _FILES.get(_ALIASES.get(name, name))
    if found is None:
        return Response(
            b"not found", status_code=404, headers=_headers("text/plain; charset=utf-8")
        )
    return Response(found.body, headers=_headers(found.content_type))
