"""``/admin``: operations on a running node that only an ``admin`` token may ask for.

* ``POST /admin/keys/rotate`` — a new key-encryption key: every data key is
  re-wrapped (no record is re-encrypted), a ``key.rotate`` transaction goes on
  the private chain, and the old key is destroyed. Answers with the rotation
  summary ``{"old": id, "new": id, "rewrapped": n}``.

``medledger keys rotate --dir`` does the same on a stopped node; this endpoint
is for a node that is serving (its keystore is open in the node process).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from medledger.api.auth import require
from medledger.api.responses import fhir_response
from medledger.node import Node
from medledger.storage.tokens import TokenInfo

__all__ = ["router"]

router = APIRouter(prefix="/admin", tags=["operations"])
Admin = Annotated[TokenInfo, Depends(require("admin"))]


@router.post("/keys/rotate", summary="rotate the key-encryption key")
async def rotate_keys(request: Request, who: Admin) -> Response:
    node: Node = request.app.state.node
    summary = await node.records.rotate_kek()
    return fhir_response(summary, headers={"Content-Type": "application/json"})
