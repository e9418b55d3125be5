"""``POST /chain/verify``: an auditor (or clinician) asks the node to re-verify its stored chains now.

The same walk as ``medledger verify --consortium`` (``ledger.verify``): the
consortium chain from genesis under the consortium's rules, then the private
chain against the institution key and every final anchor of it. It reads the
stores through connections of its own (the node keeps writing meanwhile) in a
worker thread, and only one verification runs at a time per node: a second
request while one runs is answered 409. A verification may start only once as
long has passed since the last one ended as that one took (429 with
``Retry-After`` before): whoever presses the button keeps the node's disk and
a core busy half of the time at most. The report says, per chain, what was covered or the first
problem (the step and the block), never the content of a transaction.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from medledger.api.auth import require
from medledger.api.deps import NodeDep
from medledger.api.responses import fhir_response
from medledger.core.errors import (
    Conflict,
    InvalidInput,
    MedledgerError,
    NotFound,
    RateLimited,
    VerificationError,
)
from medledger.core.keys import VerifyingKey
from medledger.ledger.consortium.verify import ConsortiumPolicy, anchored_checkpoints
from medledger.ledger.verify import Checkpoint, VerifyReport, verify_chain
from medledger.node import open_chain, open_consortium_chain
from medledger.storage.ports import TokenInfo

__all__ = ["router", "verify_stored_chains"]

router = APIRouter(prefix="/chain", tags=["chains"])
# As every /chain endpoint: an auditor, or a clinician checking the node it works with.
Auditor = Annotated[TokenInfo, Depends(require("auditor", "clinician"))]
# One verification per process at a time (a node serves one application). A thread
# lock taken without blocking: it belongs to no event loop.
_RUNNING = threading.Lock()
#: ``(ended, took)`` of the last verification, in ``time.monotonic`` seconds.
_LAST = [0.0, 0.0]


def _report(report: VerifyReport) -> dict[str, Any]:
    return {
        "chain": report.chain,
        "ok": True,
        "blocks": report.blocks,
        "log_size": report.log_size,
        "log_root": report.log_root.hex(),
        "head_hash": report.head_hash.hex(),
        "signer": report.signer,
        "checkpoints": report.checkpoints,
    }


def _failure(chain: str, exc: MedledgerError) -> dict[str, Any]:
    step = exc.step if isinstance(exc, VerificationError) else None
    return {"chain": chain, "ok": False, "step": step, "problem": str(exc)}


def verify_stored_chains(
    root: Path, *, institution: str, chain: str, key: VerifyingKey, consortium: bool
) -> dict[str, Any]:
    """Verify the node at ``root``'s chains as stored; a report, never an exception for damage.

    ``consortium``: also the consortium chain, and the private chain against
    this institution's final anchors on it.
    """
    chains: list[dict[str, Any]] = []
    checkpoints: list[Checkpoint] = []
    if consortium:
        genesis, cstore = open_consortium_chain(root)
        try:
            chains.append(_report(verify_chain(cstore, policy=ConsortiumPolicy(genesis))))
            checkpoints = anchored_checkpoints(cstore, institution)
        except MedledgerError as exc:
            chains.append(_failure(genesis.chain_id, exc))
        finally:
            cstore.close()
    _, store = open_chain(root)
    try:
        chains.append(_report(verify_chain(store, expected_key=key, checkpoints=checkpoints)))
    except MedledgerError as exc:
        chains.append(_failure(chain, exc))
    finally:
        store.close()
    return {"ok": all(c["ok"] for c in chains), "chains": chains}


@router.post("/verify", summary="re-verify this node's stored chains now (one at a time)")
async def verify_now(request: Request, node: NodeDep, who: Auditor) -> Response:
    """Every block, signature, root and stored proof node, and consistency with the anchors.

    Answers 200 with ``{"ok", "chains": [...]}`` whether or not the chains
    verify (a failed check is the report, not an error of the request); 409
    while another verification runs; 400 for any parameter or body (it takes none).
    """
    if request.query_params or await request.body():
        raise InvalidInput("verify takes no parameters and no body")
    if not _RUNNING.acquire(blocking=False):
        raise Conflict("a verification is already running on this node; retry when it ends")
    # Monotonic time bounds the duty cycle; it is no timestamp of anything recorded.
    wait_s = _LAST[0] + _LAST[1] - time.monotonic()
    if wait_s > 0:
        _RUNNING.release()
        raise RateLimited(
            "the last verification ended just now; retry shortly",
            retry_after_ms=int(wait_s * 1000) + 1,
        )

    def run() -> dict[str, Any]:
        # Released by the thread itself: a client that goes away cancels its request,
        # not the walk, and the next verification waits until this one has ended.
        started = time.monotonic()
        try:
            return verify_stored_chains(
                node.paths.root,
                institution=node.config.institution,
                chain=node.config.chain,
                key=node.config.signing_key,
                consortium=node.consortium is not None,
            )
        finally:
            ended = time.monotonic()
            _LAST[:] = [ended, ended - started]
            _RUNNING.release()

    try:
        report = await asyncio.to_thread(run)
    except NotFound as exc:
        raise NotFound(f"the stored chains cannot be opened: {exc}") from None
    return fhir_response(report, headers={"Content-Type": "application/json"})
