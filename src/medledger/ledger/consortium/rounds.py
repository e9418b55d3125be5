"""Anchor rounds: when a block of anchors is complete, and the idle notices that complete it.

Institutions anchor at the same multiples of the anchor interval, so one
block per interval carries all their anchors. Where the genesis says
``anchor_round_cut``, a block is also cut (besides by size, count or a cut
marker) as soon as every member whose anchor the previous block with anchors
held has anchored again: that is when a round of anchors is complete
(decision 0053). The rule reads only the ordered stream, so every member cuts
at the same place, and a replay cuts there again.

Where the genesis also says ``anchor_idle_notice``, a member with nothing new
to anchor at a slot sends a member-signed ``idle`` notice for the pending
height instead (not in any block), and the round is complete once each of
its members has an anchor in the pending block or a notice from the same slot
as its newest anchor, with at least one anchor (decision 0066). Which height a
notice names, and whether one is sent at all, reads this member's clocks and
view; whether it counts reads the order alone.

A block of anchors alone waits up to half an anchor interval for the rest of
its round before a member sends a cut marker, unless the round cannot
complete in this slot (decision 0067). When a marker is sent is local; where
the block is cut is still decided by the order. After a quiet spell, a
member's notice for a slot waits for another member's anchor of that slot,
so the first block after it is cut by its round too (decision 0070).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from medledger.core.consortium import ConsortiumParams, Genesis, MemberSet, idle_notice_bytes
from medledger.core.encoding import canonical_bytes
from medledger.core.errors import InvalidInput
from medledger.core.keys import SigningKey
from medledger.core.models import Signature
from medledger.ledger.clock import Clock
from medledger.ledger.consortium.messages import MSG_IDLE

__all__ = ["AnchorRounds", "PendingAnchors"]

#: Idle notices are sent while the newest block with anchors was cut at most this
#: many anchor intervals ago (or anchors are pending): a quiet consortium goes quiet.
_IDLE_ACTIVE_INTERVALS = 2


@dataclass(slots=True)
class PendingAnchors:
    """The anchors and counted idle notices in the pending block: what its round reads."""

    anchorers: set[str] = field(default_factory=set)  # members with an anchor here
    anchored_at: dict[str, int] = field(default_factory=dict)  # member -> its anchor's time_ms
    # Members with an idle notice for here: member id -> the notice's signed time_ms.
    idle: dict[str, int] = field(default_factory=dict)
    anchor_times: list[int] = field(default_factory=list)  # the anchors' signed time_ms

    def add_anchor(self, institution: str, time_ms: int) -> None:
        """An anchor by ``institution``, signed at ``time_ms``, joined the pending block."""
        self.anchorers.add(institution)
        self.anchor_times.append(time_ms)
        self.anchored_at[institution] = time_ms


class AnchorRounds:
    """One member's anchor rounds: the round the pending block waits for, and its idle notices.

    The member owns one, keeps a :class:`PendingAnchors` with its pending block,
    and tells it what the order did: :meth:`round_complete` after each transaction
    joins the pending block, :meth:`count_notice` for an ordered idle notice (both
    say whether the member must cut now), :meth:`block_cut` as it cuts a block
    (before the block becomes its tip) and :meth:`after_cut` once it has. What
    these decide from the order is the same at every member and in a replay.
    :meth:`notify_idle`, :meth:`anchor_ordered` and :meth:`marker_patience_s` decide
    only what this member sends and when, from its own clocks; nothing here ever
    cuts a block itself.

    ``voters(h)`` are the members who vote on block ``h`` (the member's
    ``_members_before``); ``send(payload, msg_id, h)`` publishes into the order,
    retrying until block ``h`` is cut.
    """

    def __init__(
        self,
        *,
        genesis: Genesis,
        member_id: str,
        key: SigningKey,
        clock: Clock,
        monotonic: Callable[[], float],
        voters: Callable[[int], MemberSet],
        send: Callable[[bytes, str, int], None],
    ) -> None:
        self._params: ConsortiumParams = genesis.params
        self._chain_id = genesis.chain_id
        self._consortium = genesis.consortium
        self._member_id = member_id
        self._key = key
        self._clock = clock
        self._monotonic = monotonic
        self._voters = voters
        self._send = send
        # The members whose anchors the newest block with anchors held: once each has
        # anchored again, the anchor round is complete and the block is cut (0053).
        self._anchor_round: frozenset[str] = frozenset()
        # Each member's newest anchor in a cut block: its signed time_ms (for 0067).
        self._anchor_cut_ms: dict[str, int] = {}
        # When (own monotonic clock) the newest block with anchors was cut, and the
        # newest height this member sent an idle notice for.
        self._anchors_cut_at: float | None = None
        self._idle_sent_height = 0
        # The slot of the newest notice sent (for ``_idle_sent_height``): a block that
        # collected only notices stays pending, and at a later slot it needs a new one.
        self._idle_sent_slot = -(10**15)
        # The slot (wall-clock ms) this member last said it had nothing new at, and
        # whether its own anchor from an earlier slot was still on its way then.
        self._idle_slot_ms: int | None = None
        self._idle_behind = False
        # Idle at that slot while anchoring was quiet: the notice waits for another
        # member's anchor of the slot to reach the order (:meth:`anchor_ordered`).
        self._idle_waiting = False

    # -- what the order decides -----------------------------------------------------------

    def round_complete(self, pending: PendingAnchors) -> bool:
        """Whether every member of the round anchored again, or sent an idle notice for here.

        Always false where the genesis does not cut by rounds. The round is the
        members with an anchor or a counted idle notice in the newest block with
        anchors; at least one anchor must be pending (a round of notices alone would
        cut an empty block). Notices are only ever counted where the genesis enables
        them (:meth:`count_notice`).

        Institutions anchor at the same multiples of the interval, so their anchors
        reach the order together; cutting once the last expected one is in saves the
        cut timer and a cut marker's trip through the order. The rule reads only the
        ordered stream, so every member cuts at the same place. A member that stops
        anchoring delays one block until the others' marker (sent after up to half an
        anchor interval: :meth:`marker_patience_s`), after which the round no longer
        expects it; a member cannot cut earlier than it already could with a marker.
        """
        return (
            self._params.anchor_round_cut
            and bool(self._anchor_round)
            and self._anchor_round <= self._round_covered(pending)
        )

    def _round_covered(self, pending: PendingAnchors) -> set[str]:
        """The members with an anchor pending, or a notice from the newest anchor's slot.

        Empty without a pending anchor. A notice counts only if its time is within
        half an anchor interval of the newest pending anchor's: a notice from an
        earlier slot (one that waited in a block nobody anchored in) says nothing
        about this one, and counting it would cut the block before that member's
        anchor for this slot arrived.
        """
        if not pending.anchor_times:
            return set()
        newest = max(pending.anchor_times)
        half = self._params.anchor_interval_ms // 2
        same_slot = {m for m, t in pending.idle.items() if abs(t - newest) <= half}
        return pending.anchorers | same_slot

    def count_notice(
        self, envelope: dict[str, Any], pending: PendingAnchors, pending_height: int
    ) -> bool:
        """Count an ordered idle notice for the pending block (``pending_height``).

        Returns whether it completes the round (the member then cuts). A notice for
        any other height (late, early, sent from a stale view) changes nothing; one
        not signed by a voter of the pending block, over ``idle_notice_bytes``, is
        refused with :class:`InvalidInput` or :class:`VerificationError`, as is any
        notice where the genesis does not enable them.
        """
        params = self._params
        if not (params.anchor_round_cut and params.anchor_idle_notice):
            raise InvalidInput("idle notices are off in this consortium")
        height, time_ms = envelope.get("height"), envelope.get("time_ms")
        if type(height) is not int or type(time_ms) is not int or time_ms < 0:
            raise InvalidInput("idle notice needs an integer height and time_ms")
        if height != pending_height:
            return False
        sig = Signature.from_json(envelope.get("signature"))
        # As for a cut marker: the members who vote on the block, whatever the
        # pending transactions would change.
        member = self._voters(height).by_fingerprint(sig.signer)
        if member is None:
            raise InvalidInput("idle notice not signed by a member")
        member.signing_key.verify(sig, idle_notice_bytes(self._chain_id, height, time_ms))
        pending.idle[member.id] = time_ms
        return self.round_complete(pending)

    def block_cut(self, cut: PendingAnchors) -> None:
        """The block holding ``cut`` is being cut: if it holds anchors, it sets the next round."""
        if cut.anchorers:
            # An idle member stays in the round: it anchors or sends a notice again
            # at the next slot. One that does neither costs one block a marker's wait.
            self._anchor_round = frozenset(self._round_covered(cut))
            self._anchors_cut_at = self._monotonic()
            self._anchor_cut_ms.update(cut.anchored_at)

    # -- what this member sends -------------------------------------------------------------

    def notify_idle(
        self, pending: PendingAnchors, tip_height: int, *, live: bool, anchor_on_the_way: bool
    ) -> bool:
        """Say through the order that this member has nothing new to anchor at this slot.

        Called (through ``ConsortiumMember.notify_idle``) by the anchorer at a slot
        where the private chain has not grown since its newest anchor;
        ``anchor_on_the_way``: that anchor was sent but is not in the order yet.
        ``pending`` is the pending block's (after block ``tip_height``); ``live``:
        the member has replayed the order. Sent only where the genesis enables idle
        notices, once live, by a voter, at most once per height and slot (a block
        that collected only notices is still pending at the next slot), and only while
        anchoring is active: anchors are pending, or the newest block with anchors
        was cut at most ``_IDLE_ACTIVE_INTERVALS`` anchor intervals ago by this
        member's monotonic clock. A consortium where nobody anchors therefore stores
        no notices (they are kept in the replicated stream). A notice not sent for
        that reason waits for another member's anchor of the slot
        (:meth:`anchor_ordered`, decision 0070).

        The notice names the block that will hold this slot's anchors: the pending
        one, or the one after it if the pending block (as seen here) still collects
        an earlier slot's anchors; and if the block it named is cut holding only an
        earlier slot's anchors before the notice arrived, it is sent again for the
        next one (:meth:`after_cut`), at most once per height and only until the
        next slot. Only what is sent reads the clocks; what counts is decided by the
        order alone (:meth:`count_notice`). Returns whether a notice was sent.
        """
        params = self._params
        if not (params.anchor_round_cut and params.anchor_idle_notice and live):
            return False
        window = _IDLE_ACTIVE_INTERVALS * params.anchor_interval_ms / 1000
        recent = (
            self._anchors_cut_at is not None and self._monotonic() - self._anchors_cut_at <= window
        )
        # The anchorer calls at its slot: this reading is the slot's time.
        self._idle_slot_ms = self._clock.now_ms()
        self._idle_behind = anchor_on_the_way
        self._idle_waiting = not (recent or pending.anchorers)
        if self._idle_waiting:
            return False
        return self._send_idle_notice(pending, tip_height)

    def anchor_ordered(self, pending: PendingAnchors, tip_height: int, *, live: bool) -> bool:
        """An anchor joined the pending block without cutting it: send a notice that waited.

        After a quiet spell a member with nothing new at its slot sends no notice
        then (:meth:`notify_idle`: a quiet consortium stays quiet), but keeps the
        slot. Another member's anchor of that slot reaching the order shows anchoring
        active again, and the notice goes out now, while the slot lasts: the first
        block after a quiet spell is then cut by its round instead of waiting half an
        interval for a cut marker (decision 0067) and the marker's pass. A member
        with an anchor of its own in the block sends none. Returns whether a notice
        was sent.
        """
        if not (self._idle_waiting and live):
            return False
        if self._member_id in pending.anchorers or not self._idle_claim_current():
            self._idle_waiting = False
            return False
        if not pending.anchorers:
            return False
        self._idle_waiting = False
        return self._send_idle_notice(pending, tip_height)

    def _idle_claim_current(self) -> bool:
        """Whether the slot this member said it is idle at has not ended (by its clock)."""
        slot = self._idle_slot_ms
        interval = self._params.anchor_interval_ms
        return slot is not None and self._clock.now_ms() < slot + interval

    def _from_earlier_slot(self, anchor_time_ms: int) -> bool:
        """Whether an anchor stamped ``anchor_time_ms`` was sent before the idle slot.

        Half an interval of slack: institutions' clocks differ by a few ms.
        """
        slot = self._idle_slot_ms
        return slot is not None and anchor_time_ms < slot - self._params.anchor_interval_ms // 2

    def _send_idle_notice(self, pending: PendingAnchors, tip_height: int) -> bool:
        """Send the notice for the current idle slot, for the block its anchors will be in."""
        slot = self._idle_slot_ms
        if slot is None or not self._idle_claim_current():
            return False
        behind = self._idle_behind or any(self._from_earlier_slot(t) for t in pending.anchor_times)
        height = tip_height + (2 if behind else 1)
        # Once per height and slot: a block of notices alone (every member idle) is not
        # cut, and a notice counts only beside anchors of its own slot, so a member idle
        # again when the next slot's anchors join that block must say so again.
        next_slot = self._idle_sent_slot + self._params.anchor_interval_ms // 2
        if height < self._idle_sent_height or (
            height == self._idle_sent_height and slot < next_slot
        ):
            return False
        if self._voters(height).by_fingerprint(self._key.fingerprint) is None:
            return False
        self._idle_sent_height, self._idle_sent_slot = height, slot
        signed = idle_notice_bytes(self._chain_id, height, slot)
        notice = canonical_bytes(
            {
                "kind": MSG_IDLE,
                "height": height,
                "time_ms": slot,
                "signature": self._key.sign(signed).to_json(),
            }
        )
        # One id per member, height and slot (the order drops a repeated id).
        self._send(notice, f"idle-{self._consortium}-{height}-{self._member_id}-{slot}", height)
        return True

    def after_cut(
        self, cut: PendingAnchors, pending: PendingAnchors, height: int, *, live: bool
    ) -> None:
        """Block ``height``, holding ``cut``, is now the tip (``pending`` is the next block's).

        If it is the block this member's notice named but held only an earlier slot's
        anchors, this slot's go in the next: say it again.
        """
        if not cut.anchorers:
            return
        if self._idle_slot_ms is None or not live:
            return
        if not self._idle_claim_current() or not all(
            self._from_earlier_slot(t) for t in cut.anchor_times
        ):
            self._idle_slot_ms = None  # the slot's block is cut, or the slot is over
            return
        if self._member_id in cut.anchorers:
            self._idle_behind = False  # this member's earlier anchor is in now
        if self._idle_sent_height == height:
            self._send_idle_notice(pending, height)

    def marker_patience_s(self, pending: PendingAnchors, tx_count: int) -> float:
        """How long the pending block's oldest tx waits before this member sends a cut marker.

        ``pending`` is the block's anchors and notices, ``tx_count`` its transactions.
        ``cut_after_ms``, except for a block of anchors alone where blocks are cut by
        rounds: there the round's other anchors were sent at the same slot and are on
        their way, and the last of them (or a member's idle notice) cuts the block
        without a marker. A marker sent after ``cut_after_ms`` would overtake an anchor
        whose institution is a few round trips further from the order, cut the block
        without it and leave that anchor to wait for the next block (decision 0067).
        So the marker waits up to half an anchor interval, the bound by which one
        slot's anchors are told from the next slot's. Only when a marker is sent is
        local: every member still cuts where the ordered marker or anchor says.
        """
        params = self._params
        cut_after = params.cut_after_ms / 1000
        if not params.anchor_round_cut or len(pending.anchor_times) != tx_count:
            return cut_after
        if not self._round_may_complete(pending):
            return cut_after
        return max(cut_after, params.anchor_interval_ms / 2000)

    def _round_may_complete(self, pending: PendingAnchors) -> bool:
        """Whether a member of the round that ``pending`` lacks may still anchor for its slot.

        Not if each of them already has an anchor from that slot (signed within half an
        interval of the newest pending anchor) in a block cut before: its anchor reached
        the order early enough to join the previous block. Waiting would then only let
        its *next* anchor complete the round, a slot late for everyone else's, and every
        later block would repeat that (measured at 40 ms RTT: one institution's
        anchors arriving ~25 ms before the others' kept the blocks a slot out of step,
        +180 ms for three institutions' records, until a marker realigned them).
        """
        newest = max(pending.anchor_times)
        half = self._params.anchor_interval_ms // 2
        for member in self._anchor_round - self._round_covered(pending):
            last = self._anchor_cut_ms.get(member)
            if last is None or abs(last - newest) > half:
                return True
        return False
