"""``/chain``: anyone with an auditor (or clinician) token can verify the node from outside.

Blocks in the export form, heads, RFC 6962 inclusion and consistency proofs of
the private chain, and the consortium chain's final blocks (signatures are
the finality certificate), anchors and equivocation evidence.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import Response

from medledger.api.auth import require
from medledger.api.deps import NodeDep
from medledger.api.responses import fhir_response
from medledger.core.errors import InvalidInput, NotFound
from medledger.core.hashing import hash_from_hex
from medledger.ledger.export import (
    block_json,
    block_line,
    consistency_proof_json,
    head_json,
    inclusion_proof_json,
)
from medledger.node import Node
from medledger.storage.ports import ChainStore, TokenInfo

__all__ = ["router"]

router = APIRouter(prefix="/chain", tags=["chains"])
Auditor = Annotated[TokenInfo, Depends(require("auditor", "clinician"))]


def _json(body: Any) -> Response:
    return fhir_response(body, headers={"Content-Type": "application/json"})


def _store(node: Node, which: str) -> ChainStore:
    if which == "private":
        private: ChainStore = node.store
        return private
    if which == "consortium":
        store = node.consortium_store
        if store is None:
            raise NotFound("this node has not joined a consortium")
        return store
    raise NotFound(f"no chain {which!r} (private or consortium)")


@router.get("/{which}/head")
async def head(which: str, node: NodeDep, who: Auditor) -> Response:
    return _json(head_json(_store(node, which)))


@router.get("/{which}/blocks/{height}")
async def block(
    which: str, height: Annotated[int, Path(ge=0, le=2**53)], node: NodeDep, who: Auditor
) -> Response:
    return _json(block_json(_store(node, which).block(height)))


#: One export response holds at most this many bytes of blocks (and at least one block);
#: the ``Medledger-Next-From`` header says where the next page starts.
MAX_EXPORT_PAGE_BYTES = 8 * 1024 * 1024


@router.get("/{which}/export")
async def export(
    which: str,
    node: NodeDep,
    who: Auditor,
    start: Annotated[int, Query(alias="from", ge=0, le=2**53)] = 0,
    end: Annotated[int | None, Query(alias="to", ge=0, le=2**53)] = None,
) -> Response:
    """Blocks ``from``..``to`` (inclusive) in the export form, one JSON line each.

    The lines of ``chain export`` / ``consortium export``; a page ends after
    :data:`MAX_EXPORT_PAGE_BYTES`, and ``Medledger-Next-From`` then names the
    next height to ask for.
    """
    if end is not None and end < start:
        raise InvalidInput(f"to {end} is before from {start}")
    store = _store(node, which)
    lines: list[bytes] = []
    size = 0
    next_from: int | None = None
    for stored in store.iter_blocks(start, None if end is None else end + 1):
        if lines and size >= MAX_EXPORT_PAGE_BYTES:
            next_from = stored.height
            break
        line = block_line(stored)
        lines.append(line)
        size += len(line)
    headers = {"Medledger-Next-From": str(next_from)} if next_from is not None else {}
    return Response(b"".join(lines), media_type="application/x-ndjson", headers=headers)


@router.get("/{which}/proof/inclusion")
async def proof_inclusion(
    which: str,
    node: NodeDep,
    who: Auditor,
    index: Annotated[int | None, Query(ge=0, le=2**53)] = None,
    tx: str | None = None,
    size: Annotated[int | None, Query(ge=1, le=2**53)] = None,
) -> Response:
    store = _store(node, which)
    if (index is None) == (tx is None):
        raise InvalidInput("give exactly one of index or tx")
    if tx is not None:
        index, _ = store.tx_by_hash(hash_from_hex(tx, "tx"))
    assert index is not None
    return _json(inclusion_proof_json(store, index, size))


@router.get("/{which}/proof/consistency")
async def proof_consistency(
    which: str,
    node: NodeDep,
    who: Auditor,
    old: Annotated[int, Query(ge=0, le=2**53)],
    new: Annotated[int | None, Query(ge=0, le=2**53)] = None,
) -> Response:
    return _json(consistency_proof_json(_store(node, which), old, new))


@router.get("/consortium/status")
async def consortium_status(node: NodeDep, who: Auditor) -> Response:
    if node.consortium is None:
        raise NotFound("this node has not joined a consortium")
    return _json(node.consortium.status())
