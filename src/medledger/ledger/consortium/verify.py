"""Verifying a consortium chain from its store alone, as an auditor would.

:class:`ConsortiumPolicy` plugs into :func:`~medledger.ledger.verify.verify_chain`:
block 0 must be exactly the genesis document's block; every later block needs
a finality certificate of votes from a quorum of the members active when it
was cut; every transaction is re-validated with the consortium rules
(signatures, membership quorums, anchor consistency proofs, no replays); and
no block's time is more than ``max_clock_skew_ms`` after its newest
transaction's signed time (``core.consortium.block_time_bound``: members
date blocks by a median of their clocks, which an auditor cannot re-derive
from the store, but every honest block meets this bound).
:func:`anchored_checkpoints` lists one institution's final anchors, so its
private chain can be checked against all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

from medledger.core.consortium import CONSORTIUM_GENESIS, Genesis, MemberSet, block_time_bound
from medledger.core.encoding import canonical_bytes
from medledger.core.errors import InvalidInput, InvalidSignature, MedledgerError, VerificationError
from medledger.core.models import Signature, Transaction
from medledger.core.transactions import ANCHOR
from medledger.ledger.consortium.modes import initial_state
from medledger.ledger.consortium.rules import ConsortiumState
from medledger.ledger.verify import Checkpoint, chain_label
from medledger.storage.ports import ChainStore

__all__ = ["ConsortiumPolicy", "anchored_checkpoints"]


class ConsortiumPolicy:
    """Block rules of a consortium chain (see module docstring)."""

    def __init__(self, genesis: Genesis) -> None:
        self._genesis = genesis
        self._state = initial_state(genesis)
        self._voters = self._state.members
        self._prev_time_ms = 0
        self._tx_times: list[int] = []
        #: ``(first height, voters)`` each time the voting members changed.
        self._voter_history: list[tuple[int, MemberSet]] = [(1, self._state.members)]
        self._height = 0  # the last block begun

    def begin_block(self, height: int, prev_time_ms: int) -> None:
        self._voters = self._state.members
        self._height = height
        if height >= 1 and self._voters is not self._voter_history[-1][1]:
            self._voter_history.append((height, self._voters))
        self._prev_time_ms = prev_time_ms
        self._tx_times = []

    def transaction(self, height: int, index: int, tx: Transaction) -> None:
        if height == 0:
            if (
                index != 0
                or tx.type != CONSORTIUM_GENESIS
                or canonical_bytes(tx.body) != canonical_bytes(self._genesis.to_json())
            ):
                raise VerificationError("block 0: not this consortium's genesis document")
            return
        try:
            self._state.check(tx)
        except MedledgerError as exc:
            raise VerificationError(
                f"block {height}: transaction {index} is invalid: {exc}"
            ) from None
        self._state.apply(tx, tx.hash(), height)
        self._tx_times.append(tx.time_ms)

    def end_block(self, height: int, time_ms: int) -> None:
        if height == 0:
            return
        skew = self._genesis.params.max_clock_skew_ms
        bound = block_time_bound(self._prev_time_ms, self._tx_times, skew)
        if time_ms > bound:
            raise VerificationError(
                f"block {height}: time {time_ms} is {time_ms - bound} ms beyond its bound "
                f"{bound} (the previous block's time, or its newest transaction's plus "
                f"max_clock_skew_ms {skew})"
            )

    def signatures(self, height: int, block_hash: bytes, signatures: Sequence[Signature]) -> None:
        if height == 0:
            return
        try:
            signers = self._voters.certificate_signers(block_hash, signatures)
        except InvalidSignature as exc:
            raise InvalidSignature(f"block {height}: finality certificate carries {exc}") from None
        if len(signers) < self._voters.quorum:
            raise InvalidSignature(
                f"block {height}: finality certificate has {len(signers)} valid member signatures, "
                f"{self._voters.quorum} needed"
            )

    def signer(self) -> str:
        return f"a quorum of {self._genesis.consortium} members"

    def chain_id(self) -> str:
        return self._genesis.chain_id

    def voters_at(self, height: int) -> MemberSet:
        """The members who vote on block ``height`` (those after block ``height - 1``).

        Beyond the verified chain: the members after its last block.
        """
        if height > self._height:
            return self._state.members
        voters = self._voter_history[0][1]
        for first, members in self._voter_history:
            if first <= height:
                voters = members
        return voters

    @property
    def genesis(self) -> Genesis:
        return self._genesis

    @property
    def state(self) -> ConsortiumState:
        return self._state


def anchored_checkpoints(store: ChainStore, institution: str) -> list[Checkpoint]:
    """Every final anchor of ``institution`` in a consortium chain, as checkpoints."""
    out = []
    for block in store.iter_blocks(1):
        for data in block.tx_data:
            tx = Transaction.decode(data)
            if tx.type == ANCHOR and tx.body.get("institution") == institution:
                where = f"{chain_label(tx.chain)}, block {block.height}"
                try:
                    out.append(
                        Checkpoint(
                            size=int(tx.body["log_size"]),
                            root=bytes.fromhex(str(tx.body["log_root"])),
                            source=f"the anchor of private height {tx.body['height']} in {where}",
                        )
                    )
                except (KeyError, ValueError):
                    raise InvalidInput(f"{where}: malformed anchor") from None
    return out
