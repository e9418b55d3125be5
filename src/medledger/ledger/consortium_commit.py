"""Consortium-only mode: record transactions ordered and finalized by the consortium.

**For benchmarks only** (``medledger bench hybrid``; decision 0011). The
product is hybrid: a record write is valid once its institution's private
chain commits it, and anchors make it globally tamper-evident. To measure
what that buys, this mode commits the *same* record transactions on the
consortium chain instead: same records service, same encryption, same
storage — only the commit path differs.

It is switched on by the consortium itself, in the genesis document
(``params.mode = "consortium-only"``), so every member and every auditor
applies the same rules: :class:`ConsortiumOnlyState` (chosen by
``ConsortiumState.from_genesis``) additionally accepts the private chain's
record transaction types, each signed by exactly one current member — the
institution that wrote it (on a private chain the institution's block
signature says that; consortium blocks are signed by a quorum instead). A
hybrid consortium still refuses them, and ``verify --consortium`` re-checks
them with the same rules.

:class:`ConsortiumCommit` gives the records service the chain interface it
uses (``chain_id``, ``store``, ``submit``, ``submit_many``) over a
:class:`~medledger.ledger.consortium.ConsortiumMember`; ``sign`` adds the
author signature, and must be applied before the records service hashes a
transaction (its index keeps the hash of the signed transaction).

Limitation: ``submit_many`` is not atomic here. The consortium orders each
transaction on its own, so a multi-resource transaction Bundle may be split
across blocks, and one refused transaction does not take back the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from medledger.core.consortium import CONSORTIUM_ONLY
from medledger.core.errors import InvalidInput
from medledger.core.hashing import hash_from_hex
from medledger.core.keys import SigningKey
from medledger.core.models import Receipt, Transaction
from medledger.ledger.clock import Clock, SystemClock
from medledger.ledger.consortium import ConsortiumMember
from medledger.ledger.consortium_rules import ConsortiumState
from medledger.storage.ports import ChainStore

__all__ = [
    "KEY_ROTATE",
    "RECORD_ERASE",
    "RECORD_PUT",
    "RECORD_TX_TYPES",
    "ConsortiumCommit",
    "ConsortiumOnlyState",
]

# The private chain's record transaction types (``services.records``; docs/formats.md).
RECORD_PUT, RECORD_ERASE, KEY_ROTATE = "record.put", "record.erase", "key.rotate"
RECORD_TX_TYPES = frozenset({RECORD_PUT, RECORD_ERASE, KEY_ROTATE})

_RECORD_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    RECORD_PUT: {
        "resource_type": (str,),
        "ref": (str,),
        "version": (int,),
        "blob": (str,),
        "patient": (str, type(None)),
    },
    RECORD_ERASE: {
        "resource_type": (str,),
        "ref": (str,),
        "versions": (int,),
        "patient": (str, type(None)),
    },
    KEY_ROTATE: {"purpose": (str,), "old": (str,), "new": (str,), "rewrapped": (int,)},
}


class ConsortiumOnlyState(ConsortiumState):
    """The consortium rules plus record transactions (consortium-only mode; see module doc)."""

    def _check_other(self, tx: Transaction) -> None:
        fields = _RECORD_FIELDS.get(tx.type)
        if fields is None:
            super()._check_other(tx)
            return
        self._signer(tx)  # exactly one signature, by a current member (the writer)
        body = tx.body
        if set(body) != set(fields):
            raise InvalidInput(f"{tx.type} must have exactly {', '.join(sorted(fields))}")
        for name, types in fields.items():
            value = body[name]
            if isinstance(value, bool) or not isinstance(value, types):
                raise InvalidInput(f"{tx.type} {name} has the wrong type")
            if isinstance(value, int) and value < 0:
                raise InvalidInput(f"{tx.type} {name} must not be negative")
        if tx.type == RECORD_PUT:
            if body["version"] < 1:
                raise InvalidInput("record.put version must be at least 1")
            hash_from_hex(body["blob"], "record.put blob")
        if tx.type != KEY_ROTATE:
            hash_from_hex(body["ref"], f"{tx.type} ref")


class ConsortiumCommit:
    """The records service's chain, backed by the consortium (consortium-only mode).

    ``submit`` and ``submit_many`` return once every transaction is in a block
    that is final at this member (and stored in ``store``, its copy of the
    consortium chain), or raise the reason the consortium refused it.
    """

    def __init__(
        self,
        member: ConsortiumMember,
        key: SigningKey,
        store: ChainStore,
        *,
        clock: Clock | None = None,
        timeout: float = 120.0,
    ) -> None:
        if member.genesis.params.mode != CONSORTIUM_ONLY:
            raise InvalidInput(
                "record transactions go on the consortium only in consortium-only mode"
            )
        self._member = member
        self._key = key
        self._store = store
        self._clock: Clock = clock or SystemClock()
        self._timeout = timeout
        self.chain_id = member.chain_id

    @property
    def store(self) -> ChainStore:
        """This member's copy of the final consortium chain."""
        return self._store

    @property
    def durable_height(self) -> int:
        """Height of the last final block this member stored."""
        return self._member.final_height

    def sign(self, tx: Transaction) -> Transaction:
        """``tx`` signed by this member, the author the consortium rules require."""
        if tx.chain != self.chain_id:
            raise InvalidInput(f"transaction names chain {tx.chain!r}, not {self.chain_id!r}")
        return Transaction(
            type=tx.type,
            chain=tx.chain,
            body=tx.body,
            time_ms=tx.time_ms,
            signatures=(self._key.sign(tx.signing_bytes()),),
        )

    async def submit(self, tx_type: str, body: dict[str, Any]) -> Receipt:
        tx = Transaction(type=tx_type, chain=self.chain_id, body=body, time_ms=self._clock.now_ms())
        return (await self.submit_many([tx]))[0]

    async def submit_many(self, txs: Sequence[Transaction]) -> list[Receipt]:
        """Order each of ``txs`` (signed here if unsigned); not atomic (see module doc)."""
        signed = [tx if tx.signatures else self.sign(tx) for tx in txs]
        for tx in signed:
            if tx.type not in RECORD_TX_TYPES:
                raise InvalidInput(f"{tx.type!r} is not a record transaction")
        return list(
            await asyncio.gather(*(self._member.submit(tx, timeout=self._timeout) for tx in signed))
        )
