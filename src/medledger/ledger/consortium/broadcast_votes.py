"""Votes that came beside the order: checked, counted, or held until their block is cut.

Each vote is also broadcast beside the order (``Orderer.broadcast``: one hop,
not replicated; decision 0063), and a member counts a vote from either path
once its signature checks against the block's voters: a quorum of member
signatures over the block hash is the same proof whichever way it came. A
broadcast often outruns the order, so a vote for a block not cut here yet is
held (at most one per member for each of the next few heights) and counted
when that block is cut. Nothing from this path reads a clock or touches a
replaying member's owed votes: blocks and block times come from the ordered
copy only, so a replay cuts the same blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from medledger.core.consortium import MemberSet
from medledger.core.encoding import parse_canonical
from medledger.core.errors import InvalidInput, MedledgerError
from medledger.core.models import BlockHeader, Signature
from medledger.ledger.consortium.messages import MSG_VOTE

__all__ = ["BroadcastVotes"]

log = logging.getLogger(__name__)

#: A broadcast vote for a block not cut here yet is held if its height is at most
#: this far beyond the tip (votes arrive ahead of the order by a few round trips).
_EARLY_HEIGHTS = 4
#: A broadcast larger than this is no vote (a vote is a header and two signatures).
_MAX_BROADCAST_BYTES = 16 * 1024


class BroadcastVotes:
    """One member's votes from the broadcast path, on their way to its vote count.

    :meth:`receive` takes each broadcast payload: a vote for a block cut here is
    passed to ``count`` at once; one for a block not cut yet is checked against
    ``voters(tip + 1)`` (the members who vote on the next block) and held; anything
    else raises or is dropped. :meth:`block_cut` passes on the votes held for a
    block just cut, for ``count`` to check again against that block's voters.
    ``count(envelope)`` is the member's vote count for a vote not from the order;
    it raises :class:`MedledgerError` for a vote it refuses.
    """

    def __init__(
        self,
        *,
        chain_id: str,
        vote_memory: int,
        voters: Callable[[int], MemberSet],
        count: Callable[[dict[str, Any]], None],
    ) -> None:
        """``vote_memory``: votes are tracked for this many heights below the final one."""
        self._chain_id = chain_id
        self._vote_memory = vote_memory
        self._voters = voters
        self._count = count
        # Votes for heights not cut yet: height -> signer fingerprint -> envelope.
        self._early_votes: dict[int, dict[str, dict[str, Any]]] = {}

    def receive(self, payload: bytes, *, tip_height: int, final_height: int) -> None:
        """A vote that came beside the order: counted, held for a block not cut yet, or dropped.

        Raises :class:`InvalidInput` / :class:`VerificationError` for what is no valid
        member vote.
        """
        if len(payload) > _MAX_BROADCAST_BYTES:
            raise InvalidInput(f"broadcast of {len(payload)} bytes is no vote")
        envelope = parse_canonical(payload)
        if not isinstance(envelope, dict) or envelope.get("kind") != MSG_VOTE:
            raise InvalidInput("broadcast is no vote")
        header = BlockHeader.from_json(envelope.get("header"))
        if header.chain != self._chain_id or header.height < 1:
            raise InvalidInput("vote for a block of another chain or for genesis")
        height = header.height
        if height <= final_height - self._vote_memory:
            return  # its block is long final; a conflict there is no longer tracked
        if height <= tip_height:
            self._count(envelope)
            return
        if height > tip_height + _EARLY_HEIGHTS:
            raise InvalidInput(f"vote for height {height}, far beyond the tip")
        # Not cut here yet: its voters are not known for sure, so check it against
        # the members who vote on the next block and keep one vote per member.
        sig = Signature.from_json(envelope.get("signature"))
        member = self._voters(tip_height + 1).by_fingerprint(sig.signer)
        if member is None:
            raise InvalidInput(f"vote at height {height} from a non-member key")
        member.signing_key.verify(sig, header.hash())
        self._early_votes.setdefault(height, {}).setdefault(sig.signer, envelope)

    def block_cut(self, height: int) -> None:
        """Count the votes held for ``height``, now cut (checked again, as cut)."""
        for stale in [h for h in self._early_votes if h < height]:
            del self._early_votes[stale]
        for envelope in self._early_votes.pop(height, {}).values():
            try:
                self._count(envelope)
            except MedledgerError as exc:
                log.debug("broadcast vote for block %d ignored: %s", height, exc)
