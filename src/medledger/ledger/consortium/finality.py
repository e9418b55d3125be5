"""Vote counting and finality: which cut blocks are final, and who equivocated.

* Each member signs the block hash and publishes a ``vote``. A block is final
  with votes from a quorum of ⌊(n+f)/2⌋+1 members; only final blocks are
  stored, with their votes as the finality certificate. A member voting for
  two different blocks at one height is recorded as equivocation evidence
  and no longer counted.
* A certificate holds only the votes of the block's own voters, by their key
  at that height, sorted by signer, so it holds nothing an auditor would
  refuse (strict certificates). A vote from either path (the order, or
  broadcast beside it) counts the same; which quorum arrived first may
  differ between members, and any quorum is valid.
* Votes are kept for the last :data:`VOTE_MEMORY` final heights, so a
  conflicting vote for a block already final is still evidence.
* A final block the store refuses (a full disk) is stored again in the
  background until it sticks: every vote for it may already be consumed, so
  no later message would bring the member up to date.

Nothing here reads a clock or decides a block boundary: what becomes final,
and with which certificate, follows from the votes counted and the blocks
cut, in the order the member hands them over.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from medledger.core.consortium import Member, MemberSet
from medledger.core.encoding import canonical_bytes
from medledger.core.errors import InvalidInput, MedledgerError, StorageError
from medledger.core.models import BlockHeader, Signature
from medledger.ledger.consortium.evidence import Evidence
from medledger.ledger.consortium.rules import ConsortiumState
from medledger.storage.ports import ChainStore, NewBlock

__all__ = ["VOTE_MEMORY", "Cut", "Finality"]

log = logging.getLogger(__name__)

#: How many final heights' votes are kept to detect late equivocation.
VOTE_MEMORY = 1024


@dataclass(slots=True)
class Cut:
    """A block cut locally, waiting for a quorum of votes."""

    block: NewBlock
    members: MemberSet  # who may vote on it
    state: ConsortiumState  # the state after it


class Finality:
    """One member's vote count: the blocks cut and not yet final, their votes, and what is final.

    The member tells it what happened, in stream order: :meth:`add_cut` for each
    block it cuts, then :meth:`try_finalize`; for each vote, :meth:`voter` (which
    member signed it, refusing a signature that does not check) and then
    :meth:`count`. A block becomes final, in height order, once a quorum of its
    voters voted for it: it is stored (unless ``stored_height`` says it already
    is), the state after it becomes :attr:`state`, ``members_changed(members)``
    is called if that changed the member set, ``finalized(block)`` is called
    (the member settles its waiting submitters there), and :meth:`until` wakes.
    Neither callback may raise: the block is final by then.

    ``spawn(coroutine)`` runs a background task the member cancels on close
    (used to store a refused final block again). ``evidence_path``, if given, is
    the evidence file each new piece of equivocation evidence is appended to.
    """

    def __init__(
        self,
        *,
        store: ChainStore,
        state: ConsortiumState,
        stored_height: int,
        evidence_path: Path | None,
        members_changed: Callable[[MemberSet], None],
        finalized: Callable[[NewBlock], None],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
    ) -> None:
        """``state``: the state after genesis; ``stored_height``: the stored chain's head."""
        self._store = store
        self._evidence_path = evidence_path
        self._members_changed = members_changed
        self._finalized = finalized
        self._spawn = spawn
        self._store_retry: asyncio.Task[None] | None = None
        self._cuts: dict[int, Cut] = {}
        self._votes: dict[int, dict[str, tuple[bytes, Signature, BlockHeader]]] = {}
        self._final_height = 0
        self._final_state = state
        self._stored_height = stored_height
        self._evidence: list[Evidence] = []
        self._equivocators: set[str] = set()
        self._final_event = asyncio.Event()

    # -- views ------------------------------------------------------------------------------

    @property
    def height(self) -> int:
        """The newest final height."""
        return self._final_height

    @property
    def state(self) -> ConsortiumState:
        """The state as of the last final block."""
        return self._final_state

    @property
    def stored_height(self) -> int:
        """The newest height in the store (stored means final; a replay may be behind it)."""
        return self._stored_height

    @property
    def evidence(self) -> tuple[Evidence, ...]:
        """The equivocation evidence found since start, in the order found."""
        return tuple(self._evidence)

    def cut(self, height: int) -> Cut | None:
        """Block ``height`` if it is cut and not final yet."""
        return self._cuts.get(height)

    async def until(self, height: int) -> None:
        """Return once ``height`` is final."""
        while self._final_height < height:
            await self._final_event.wait()

    # -- what the member hands over ---------------------------------------------------------

    def add_cut(self, cut: Cut) -> None:
        """A block was cut locally; it waits here for a quorum of votes."""
        self._cuts[cut.block.header.height] = cut

    def voter(self, height: int, sig: Signature, block_hash: bytes) -> Member:
        """Who signed ``sig`` over ``block_hash``, as a voter on block ``height``.

        Checked against the block's voters if it is cut and not final, else the
        final members. Raises :class:`InvalidInput` for a non-member key, and
        the key's error for a signature that does not verify.
        """
        cut = self._cuts.get(height)
        members = cut.members if cut is not None else self._final_state.members
        member = members.by_fingerprint(sig.signer)
        if member is None:
            raise InvalidInput(f"vote at height {height} from a non-member key")
        member.signing_key.verify(sig, block_hash)
        return member

    def count(self, member: str, header: BlockHeader, block_hash: bytes, sig: Signature) -> None:
        """Count ``member``'s checked vote for ``header`` (whose hash is ``block_hash``).

        A second vote by a member at one height is dropped; if it is for another
        block, the pair is recorded as evidence and the member is no longer
        counted. A first vote may make blocks final (:meth:`try_finalize`).
        """
        height = header.height
        votes = self._votes.setdefault(height, {})
        previous = votes.get(member)
        if previous is not None:
            if previous[0] != block_hash and member not in self._equivocators:
                self._equivocators.add(member)
                evidence = Evidence(
                    member=member,
                    height=height,
                    first_header=previous[2],
                    first=previous[1],
                    second_header=header,
                    second=sig,
                )
                self._evidence.append(evidence)
                self._record_evidence(evidence)
                log.warning("equivocation by %s at height %d", member, height)
            return
        votes[member] = (block_hash, sig, header)
        self.try_finalize()

    def _record_evidence(self, evidence: Evidence) -> None:
        """Append evidence to the evidence file (kept across restarts, shown by status)."""
        if self._evidence_path is None:
            return
        line = canonical_bytes(evidence.to_json()) + b"\n"
        try:
            existing = self._evidence_path.read_bytes() if self._evidence_path.exists() else b""
            if line not in existing:
                with self._evidence_path.open("ab") as f:
                    f.write(line)
        except OSError as exc:
            log.error("cannot record equivocation evidence: %s", exc)

    def try_finalize(self) -> None:
        """Make final, in height order, each next cut block a quorum of its voters voted for."""
        while True:
            height = self._final_height + 1
            cut = self._cuts.get(height)
            if cut is None:
                return
            votes = self._votes.get(height, {})
            # Only the votes of this block's voters, by their key at this height: a vote
            # checked before the block was cut was checked against the final members,
            # who may differ (a member removed or rotated in a block not yet final). A
            # certificate holds nothing an auditor would refuse (strict certificates).
            good = sorted(
                (
                    sig
                    for member, (h, sig, _) in votes.items()
                    if h == cut.block.block_hash
                    and member not in self._equivocators
                    and (voter := cut.members.by_fingerprint(sig.signer)) is not None
                    and voter.id == member
                ),
                key=lambda s: s.signer,
            )
            if len(good) < cut.members.quorum:
                return
            if height > self._stored_height:
                try:
                    self._store.append_block(replace(cut.block, signatures=tuple(good)))
                except StorageError as exc:
                    self._retry_store(height, exc)
                    return
                self._stored_height = height
            self._final_height = height
            changed = cut.state.members is not self._final_state.members
            self._final_state = cut.state
            if changed:
                self._members_changed(cut.state.members)
            del self._cuts[height]
            # Keep recent votes: a conflicting vote for a final height is still evidence.
            self._votes.pop(height - VOTE_MEMORY, None)
            self._finalized(cut.block)
            self._final_event.set()
            self._final_event = asyncio.Event()

    def _retry_store(self, height: int, exc: StorageError) -> None:
        """Store final block ``height`` again until it sticks (e.g. after a disk-full period).

        Every vote for it may already be consumed, so no later message needs to
        arrive: without this the member stayed a block behind (and its view of
        anchors with it, so its own anchors were refused) until the next write.
        """
        if self._store_retry is not None and not self._store_retry.done():
            return
        log.warning("final block %d could not be stored, retrying: %s", height, exc)

        async def retry() -> None:
            delay = 0.05
            while self._final_height < height:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                try:
                    self.try_finalize()
                except MedledgerError as error:
                    log.warning("final block %d still not stored: %s", height, error)

        self._store_retry = self._spawn(retry())
