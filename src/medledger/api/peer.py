"""``/peer/v1``: member-to-member sharing. No bearer token: every request is signed.

The body is a signed peer request (``core.peer``); the holder checks it and
the patient's consent (``services.sharing``) and answers with the ciphertext,
the data key wrapped to the reader, and the record's provenance — or a FHIR
OperationOutcome saying why not (403 consent, 400 stale/replayed/malformed,
401-like signature failures as 403 ``security``).

Over TLS the client certificate (verified against the current members'
pinned certificates by the handshake) must be the signer's own: a request
signed by member A arriving on member B's connection is refused (403
``security``). A body that is not a request signed by a current member is refused before
anything is written, and counts as a failed authentication of the client
address (``api.auth.AuthFailures``): past that budget the answer is 429.
"""

from __future__ import annotations

from typing import Literal

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from medledger.api.deps import Services
from medledger.api.fhir import read_body
from medledger.api.server import PEER_CERT_SCOPE_KEY
from medledger.core.errors import MedledgerError, NotFound

__all__ = ["router"]

router = APIRouter(prefix="/peer/v1", tags=["peer"])
#: A signed request is a few hundred bytes; anything far larger is refused unread.
MAX_PEER_REQUEST_BYTES = 16 * 1024


@router.post("/{op}")
async def peer(op: Literal["fetch", "list"], request: Request, services: Services) -> Response:
    """Serve a member's signed ``fetch`` or ``list`` request."""
    node = services.node
    if node.sharing is None:
        raise NotFound("this node has not joined a consortium")
    try:
        document = await read_body(request, MAX_PEER_REQUEST_BYTES)
        authenticated = node.sharing.authenticate(document, request.scope.get(PEER_CERT_SCOPE_KEY))
    except MedledgerError:
        await services.auth_failures.charge(request)
        raise
    answer = await node.sharing.serve(op, authenticated)
    # Plain JSON of strings and integers (base64 ciphertext, hex proofs): orjson.
    return Response(orjson.dumps(answer), media_type="application/json")
