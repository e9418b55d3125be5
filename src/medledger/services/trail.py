"""A patient's trail: every consent, access and enrollment tx about them, found by an index.

Chains are append-only, so :class:`TrailIndex` reads each block once: it
remembers, per patient key, where that patient's trail items sit (chain,
height, log index, batch entry) and, per key fingerprint, the institution
pseudonyms ``patient.enroll`` linked to it. A query reads only the blocks
added since the last one plus the patient's own transactions, instead of
every transaction of every chain the node holds.

The index is derived data held in memory: the chains stay the only source of
truth, and a restarted node rebuilds it on its first query.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from medledger.core.consent import CONSENT_GRANT, CONSENT_REVOKE
from medledger.core.enrollment import (
    IDENTITY_TYPES,
    PATIENT_ENROLL,
    PATIENT_REBIND,
    PATIENT_ROTATE,
)
from medledger.core.hashing import sha256
from medledger.core.models import Transaction
from medledger.core.transactions import ACCESS, ACCESS_BATCH
from medledger.storage.ports import ChainStore

__all__ = ["EVENTS", "PATIENT_ENROLL", "TrailIndex", "patient_trail"]

_TRAIL_TYPES = frozenset({ACCESS, CONSENT_GRANT, CONSENT_REVOKE})
#: Transactions read between two yields to the event loop while catching up
#: (about 15 ms of decoding).
_TXS_PER_SLICE = 2_000


class _Where(NamedTuple):
    store: int
    height: int
    log_index: int
    entry: int  # position in an access.batch; -1 for a tx that is one item


def _items(data: bytes, height: int) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """``(patient key, batch entry or -1, item)`` for each trail item in one tx.

    Identity txs also yield links (see :func:`_identity_items`).
    """
    tx = Transaction.decode(data)
    body = tx.body
    where = {
        "chain": tx.chain,
        "height": height,
        "tx": sha256(data).hex(),
        "time_ms": tx.time_ms,
        "type": tx.type,
    }
    if tx.type in IDENTITY_TYPES:
        yield from _identity_items(tx, where)
    elif tx.type in _TRAIL_TYPES:
        item = where | {k: v for k, v in body.items() if k != "patient_key"}
        if tx.type == CONSENT_GRANT:
            item["consent"] = item["tx"]
        yield str(body.get("patient")), -1, item
    elif tx.type == ACCESS_BATCH:
        # One trail item per summary, as if each were its own ``access`` tx.
        for n, entry in enumerate(body.get("entries") or []):
            item = where | entry | {"type": ACCESS, "holder": body.get("holder")}
            yield str(entry.get("patient")), n, item | {"entry": n}


#: How ``audit`` names each identity transaction in a trail.
EVENTS = {
    PATIENT_ENROLL: "enrollment",
    PATIENT_ROTATE: "key rotation",
    PATIENT_REBIND: "break-glass re-binding",
}


def _identity_items(
    tx: Transaction, where: dict[str, Any]
) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Links and trail items of an enrollment, rotation or break-glass re-binding.

    On the private chain the new key is linked to the Patient's pseudonym
    (``enroll:<fingerprint>``) and the previous key's link ends here
    (``unlink:<fingerprint>``); the event itself is an item of both keys'
    trails. The consortium's ``patient.rebind`` report is an item of both.
    """
    body = tx.body
    patient, previous = str(body.get("patient")), str(body.get("previous") or "")
    pseudonym = body.get("pseudonym")
    if isinstance(pseudonym, str):
        yield f"enroll:{patient}", -1, {"pseudonym": pseudonym}
        if previous:
            yield f"unlink:{previous}", -1, {"pseudonym": pseudonym}
    if tx.type == PATIENT_ENROLL and "signature" not in body:
        return  # written before enrollments were signed: a link, not an event
    item = where | {"event": EVENTS[tx.type], "patient": patient}
    item |= {k: body[k] for k in ("previous", "actor", "institution", "report") if k in body}
    yield patient, -1, item
    if previous:
        yield previous, -1, item


class TrailIndex:
    """Where each patient's consent and access txs are, over chains this node holds.

    ``stores`` are read, never written. Call :meth:`catch_up` (or
    :meth:`catch_up_async` on an event loop) before :meth:`trail` to include
    blocks appended since the last call.
    """

    def __init__(self, stores: Sequence[ChainStore]) -> None:
        self._stores = list(stores)
        self._next_height = [1] * len(self._stores)  # block 0 is the genesis
        self._where: defaultdict[str, list[_Where]] = defaultdict(list)
        self._lock = asyncio.Lock()

    def catch_up(self, max_txs: int | None = None) -> bool:
        """Index blocks not seen yet; ``True`` once at every head.

        With ``max_txs``, stop after the block that reaches that many
        transactions (and return ``False`` if blocks may remain).
        """
        budget = max_txs
        for n, store in enumerate(self._stores):
            for block in store.iter_blocks(self._next_height[n]):
                for offset, data in enumerate(block.tx_data):
                    for key, entry, _ in _items(data, block.height):
                        self._where[key].append(
                            _Where(n, block.height, block.first_index + offset, entry)
                        )
                self._next_height[n] = block.height + 1
                if budget is not None:
                    budget -= len(block.tx_data)
                    if budget <= 0:
                        return False
        return True

    async def catch_up_async(self) -> None:
        """:meth:`catch_up` in slices, so a long first scan never stalls the event loop."""
        async with self._lock:
            while not self.catch_up(_TXS_PER_SLICE):
                await asyncio.sleep(0)

    def trail(self, fingerprint: str) -> list[dict[str, Any]]:
        """Every indexed consent, access and identity tx about the patient, oldest first.

        Local reads are recorded under the institution's keyed pseudonym;
        enrollments link those to the fingerprint, until a rotation or
        break-glass re-binding moves the Patient to another key. Each item:
        ``{"chain", "height", "tx", "time_ms", "type", **body}`` (plus
        ``"entry"`` for a summary inside an ``access.batch``).
        """
        read: dict[tuple[int, int], list[tuple[str, int, dict[str, Any]]]] = {}

        def items_at(where: _Where) -> list[tuple[str, int, dict[str, Any]]]:
            # A batch holding several of the patient's reads is decoded once.
            at = (where.store, where.log_index)
            if at not in read:
                data = self._stores[where.store].tx_data(where.log_index)
                read[at] = list(_items(data, where.height))
            return read[at]

        def linked(kind: str) -> Iterator[tuple[_Where, str]]:
            key = f"{kind}:{fingerprint}"
            for link in self._where.get(key, []):
                for item_key, _, item in items_at(link):
                    if item_key == key:
                        yield link, item["pseudonym"]

        # A key sees its Patient's local reads up to where it stopped being bound.
        until: dict[str, tuple[int, int] | None] = {fingerprint: None}
        for _, pseudonym in linked("enroll"):
            until.setdefault(pseudonym, None)
        for cut, pseudonym in linked("unlink"):
            until[pseudonym] = (cut.store, cut.log_index)
        found = [
            ((item["time_ms"], item["chain"], where.log_index, where.entry), item)
            for key, cut in until.items()
            for where in self._where.get(key, [])
            if cut is None or where.store != cut[0] or where.log_index < cut[1]
            for item_key, entry, item in items_at(where)
            if item_key == key and entry == where.entry
        ]
        return [item for _, item in sorted(found, key=lambda pair: pair[0])]


def patient_trail(stores: Sequence[ChainStore], fingerprint: str) -> list[dict[str, Any]]:
    """The patient's trail over ``stores`` in one pass (for one-shot tools such as the CLI)."""
    index = TrailIndex(stores)
    index.catch_up()
    return index.trail(fingerprint)
