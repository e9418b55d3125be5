"""The consortium-only commit path of ``medledger bench hybrid`` (decision 0011).

The product is hybrid: a record write is valid once its institution's private
chain commits it, and anchors make it globally tamper-evident. To measure
what that buys, this mode commits the *same* record transactions on the
consortium chain instead: same records service, same encryption, same
storage — only the commit path differs. The consortium's genesis says
``params.mode = "consortium-only"``, so every member and auditor applies the
rules of ``ledger.consortium.modes.ConsortiumOnlyState``.

:class:`ConsortiumCommit` gives the records service the chain interface it
uses (``chain_id``, ``store``, ``durable_height``, ``submit``,
``submit_many``) over a :class:`~medledger.ledger.consortium.member.ConsortiumMember`;
``sign`` adds the author signature, and must be applied before the records
service hashes a transaction (its index keeps the hash of the signed
transaction).

``submit_many`` is not atomic here: the consortium orders each transaction on
its own, so a FHIR transaction Bundle may be split across blocks. One more
reason this mode is a benchmark and not offered to users.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from medledger.core.consortium import CONSORTIUM_ONLY
from medledger.core.errors import InvalidInput
from medledger.core.keys import SigningKey
from medledger.core.models import Receipt, Transaction
from medledger.ledger.clock import Clock, SystemClock
from medledger.ledger.consortium.member import ConsortiumMember
from medledger.ledger.consortium.modes import RECORD_TX_TYPES
from medledger.storage.ports import ChainStore

__all__ = ["ConsortiumCommit"]


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
