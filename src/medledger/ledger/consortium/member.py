"""A member's view of the consortium chain: validate, cut, vote, finalize.

Every member consumes the same ordered stream (see ``ledger.ordering``) and
applies the same deterministic rules, so honest members cut byte-identical
blocks without talking to each other:

* ``tx`` messages are validated against the state so far (``ConsortiumState``);
  valid ones join the pending block, invalid ones are dropped by everyone
  (the submitter learns why).
* A block is cut when it reaches ``max_block_txs`` or ``max_block_bytes``, or
  when a member-signed ``cut`` marker for the next height arrives: a member
  whose oldest pending tx is ``cut_after_ms`` old publishes one, as Fabric's
  Kafka orderer did with time-to-cut messages; no local clock decides a block
  boundary. Where the genesis says ``anchor_round_cut``, a block is also cut
  as soon as its round of anchors is complete, counting members' ``idle``
  notices where it also says ``anchor_idle_notice``; and a block of anchors
  alone waits longer before a member sends a marker. Those rules, and when a
  member sends a notice, are in ``rounds`` (decisions 0053, 0066, 0067).
* Block time comes from the members' clocks, not the ordering service's (a
  ``solo`` order is stamped by whichever member published; a JetStream order
  by one server): each vote carries its member's signed clock reading, and
  a block's time is the lower median of the voting members' latest readings,
  capped at ``max_clock_skew_ms`` after the block's newest transaction and
  never before the previous block (``core.consortium.block_time``). Every
  member sees the same readings at the same place in the stream, so all cut
  the same header; a minority of wrong clocks cannot move it.
* Each member signs the block hash and publishes a ``vote``. A block is final
  with votes from a quorum of its voters, stored with their votes as the
  finality certificate; a member voting for two different blocks at one
  height is recorded as equivocation evidence. The count, and what is
  final, are in ``finality``.
* Each vote is also broadcast beside the order (``Orderer.broadcast``: one
  hop, not replicated; decision 0063), and a member counts a vote from
  either path once its signature checks against the block's voters: a quorum
  of member signatures over the block hash is the same proof whichever way
  it came. Blocks are still cut from the order alone, and clock readings
  (block time) are taken only from the ordered copy, so a replay cuts the
  same blocks. A broadcast vote for a block not cut here yet is held until
  it is cut (``broadcast_votes``). Certificates may then differ between
  members (any quorum is valid).
* A restarted member replays the stream from the start over its stored chain.
  It does not vote again where its vote is already in the order: a block it
  holds is final (its vote is not needed), and the vote for a block cut
  during replay waits until the replay has reached the stream's length at
  start; if the member's own vote for that block turns up in the replay, it
  is not sent again. So votes are not repeated however long the chain, and
  a member never signs a second, different block at a height it voted on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from medledger.core.consortium import (
    CONSORTIUM_GENESIS,
    Genesis,
    Member,
    MemberSet,
    block_time,
    clock_bytes,
)
from medledger.core.encoding import canonical_bytes, parse_canonical
from medledger.core.errors import InvalidInput, MedledgerError, OrderingError, VerificationError
from medledger.core.hashing import ZERO_HASH, sha256
from medledger.core.keys import SigningKey
from medledger.core.merkle import CompactRange, leaf_hash
from medledger.core.models import BlockHeader, Receipt, Signature, Transaction
from medledger.core.transactions import ANCHOR
from medledger.ledger.clock import Clock, SystemClock
from medledger.ledger.consortium.broadcast_votes import BroadcastVotes
from medledger.ledger.consortium.evidence import Evidence
from medledger.ledger.consortium.finality import VOTE_MEMORY, Cut, Finality
from medledger.ledger.consortium.messages import MSG_CUT, MSG_IDLE, MSG_TX, MSG_VOTE
from medledger.ledger.consortium.modes import initial_state
from medledger.ledger.consortium.rounds import AnchorRounds, PendingAnchors
from medledger.ledger.consortium.rules import AnchorRecord, ConsortiumState
from medledger.ledger.ordering.port import MAX_MESSAGE_BYTES, Orderer
from medledger.ledger.supervision import SupervisedTask
from medledger.storage.ports import ChainStore, NewBlock

__all__ = ["ConsortiumMember", "Evidence", "genesis_block"]

log = logging.getLogger(__name__)

#: A vote or cut marker whose publish failed is retried after this long, doubling
#: up to the maximum, for as long as it is needed.
_REPUBLISH_MIN_S = 0.5
_REPUBLISH_MAX_S = 5.0


def _marker_bytes(chain_id: str, height: int) -> bytes:
    """What a member signs to ask for a cut at ``height``."""
    return canonical_bytes({"chain": chain_id, "kind": MSG_CUT, "height": height})


def genesis_block(genesis: Genesis) -> NewBlock:
    """Block 0 of the consortium chain: the genesis document as its only transaction."""
    tx = Transaction(
        type=CONSORTIUM_GENESIS,
        chain=genesis.chain_id,
        body=genesis.to_json(),
        time_ms=genesis.time_ms,
    )
    data = tx.encode()
    log_range = CompactRange()
    nodes = log_range.append(leaf_hash(data))[1:]
    header = BlockHeader(
        chain=genesis.chain_id,
        height=0,
        prev_hash=ZERO_HASH,
        tx_root=log_range.root(),
        tx_count=1,
        log_size=1,
        log_root=log_range.root(),
        time_ms=genesis.time_ms,
        proposer=genesis.consortium,
    )
    header_bytes = header.encode()
    return NewBlock(
        header=header,
        header_bytes=header_bytes,
        block_hash=sha256(header_bytes),
        signatures=(),
        first_index=0,
        tx_data=[data],
        tx_hashes=[sha256(data)],
        nodes=nodes,
    )


@dataclass(slots=True)
class _Pending:
    txs: list[tuple[bytes, bytes]] = field(default_factory=list)  # (data, hash)
    tx_times: list[int] = field(default_factory=list)  # each tx's signed time_ms
    size: int = 0
    first_seen: float | None = None
    marker_sent: bool = False
    anchors: PendingAnchors = field(default_factory=PendingAnchors)  # what its round reads


class ConsortiumMember:
    """Runs one member's consortium chain over an :class:`Orderer` and a :class:`ChainStore`."""

    def __init__(
        self,
        *,
        genesis: Genesis,
        member_id: str,
        key: SigningKey,
        orderer: Orderer,
        store: ChainStore,
        clock: Clock | None = None,
        monotonic: Callable[[], float] | None = None,
        evidence_path: Path | None = None,
    ) -> None:
        if genesis.members and all(m.id != member_id for m in genesis.members):
            log.info("starting as an observer: %s is not a founding member", member_id)
        self.genesis = genesis
        self.member_id = member_id
        self._key = key
        self._orderer = orderer
        self._store = store
        self._clock: Clock = clock or SystemClock()
        self._monotonic = monotonic or time.monotonic
        self._background: set[asyncio.Task[None]] = set()
        self.chain_id = genesis.chain_id
        # Tip (cut, maybe not final) and committed (final, stored) positions.
        first = genesis_block(genesis)
        self._tip_header = first.header
        self._tip_hash = first.block_hash
        self._log = CompactRange()
        self._log.append(leaf_hash(first.tx_data[0]))
        self._state = initial_state(genesis)
        self._pending = _Pending()
        self._rounds = AnchorRounds(
            genesis=genesis,
            member_id=member_id,
            key=key,
            clock=self._clock,
            monotonic=self._monotonic,
            voters=self._members_before,
            send=self._send_until_cut,
        )
        # Each member's latest signed clock reading (from its votes), by member id.
        self._readings: dict[str, int] = {}
        self._waiters: dict[bytes, asyncio.Future[Receipt]] = {}
        # Set when the cut timer may have work: a first pending tx, or going live.
        self._cut_wanted = asyncio.Event()
        self._mid_message = False  # the consume task is applying a message
        #: The member's long-running tasks; a dead one is logged and shows in ``problems``.
        self.tasks = (
            SupervisedTask(
                "consortium-consume",
                self._consume,
                # Resuming at the next message is exact, unless a message was
                # half applied: then only a restart (a fresh replay) is safe.
                restart_if=lambda _exc: not self._mid_message,
            ),
            SupervisedTask("consortium-cut-timer", self._cut_timer),
            SupervisedTask("consortium-broadcast-votes", self._listen_votes),
        )
        self._diverged: str | None = None
        #: Called with the new member set when a final block changed it (the node
        #: re-reads its TLS trust there); an exception is logged, never raised.
        self.on_members_changed: Callable[[MemberSet], None] | None = None
        self._finality = Finality(
            store=store,
            state=self._state.copy(),
            stored_height=self._check_stored_genesis(first),
            evidence_path=evidence_path,
            members_changed=self._members_changed,
            finalized=self._settle_waiters,
            spawn=self._spawn,
        )
        # Replay: the stream's length when this member started reading (learned by
        # the consume task); until it is reached, own votes wait in ``_unvoted``.
        self._replay_to: int | None = None
        self._live = False
        self._unvoted: dict[int, bytes] = {}  # height -> hash of the block cut
        self._broadcast_votes = BroadcastVotes(
            chain_id=self.chain_id,
            vote_memory=VOTE_MEMORY,
            voters=self._members_before,
            count=functools.partial(self._on_vote, ordered=False),
        )
        self._next_seq = 1  # the next stream sequence to consume

    def _check_stored_genesis(self, first: NewBlock) -> int:
        head = self._store.head_header_bytes()
        if head is None:
            self._store.append_block(first)
            return 0
        stored = self._store.block(0)
        if stored.block_hash != first.block_hash:
            raise VerificationError("the stored consortium chain has a different genesis block")
        return BlockHeader.decode(head).height

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Replay the ordered stream from the start, then follow it and run the cut timer."""
        for task in self.tasks:
            task.start()

    async def close(self) -> None:
        for task in self.tasks:
            await task.close()
        for background in list(self._background):
            background.cancel()
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(OrderingError("consortium member is shutting down"))
                fut.exception()  # retrieved: a closing member's waiters need no warning

    # -- submitting ---------------------------------------------------------------------

    def sign(self, tx: Transaction) -> Transaction:
        """``tx`` signed by this member (as the author of a member-signed tx)."""
        return replace(tx, signatures=(self._key.sign(tx.signing_bytes()),))

    async def submit(
        self, tx: Transaction, *, timeout: float = 30.0, check_early: bool = True
    ) -> Receipt:
        """Publish ``tx`` and wait until it is in a final block (or refused by the rules).

        Raises :class:`InvalidInput` / :class:`VerificationError` with the reason every
        member refuses it, or :class:`OrderingError` if ordering fails or times out.
        ``check_early=False`` skips the check against the state so far, for a tx
        that builds on one not in the order yet (a pipelined anchor); the ordered
        check still decides.
        """
        data = tx.encode()
        if len(data) > MAX_MESSAGE_BYTES // 2:
            raise InvalidInput(f"transaction of {len(data)} bytes is too large for the consortium")
        # Refuse early what every member would refuse; the ordered check is authoritative.
        # (Signatures are checked once, when the ordered copy arrives.)
        if check_early:
            self._state.copy().check(tx, verify_signatures=False)
        tx_hash = sha256(data)
        fut = self._waiters.get(tx_hash)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._waiters[tx_hash] = fut
        envelope = canonical_bytes({"kind": MSG_TX, "tx": tx.to_json()})
        await self._orderer.publish(f"tx-{tx_hash.hex()}", envelope)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            self._waiters.pop(tx_hash, None)
            raise OrderingError(
                f"transaction {tx_hash.hex()[:16]}… was not final within {timeout} s"
            ) from None

    # -- the ordered stream ---------------------------------------------------------------

    async def _consume(self) -> None:
        if self._replay_to is None:
            try:
                self._replay_to = await self._orderer.last_seq()
            except OrderingError as exc:
                # Without the length, vote as blocks are cut: a repeated vote is
                # wasteful but harmless (the same block, the same key).
                log.warning("cannot learn the order's length, votes may repeat: %s", exc)
                self._replay_to = 0
        if not self._live and self._next_seq > self._replay_to:
            self._go_live()
        async for msg in self._orderer.read(self._next_seq):
            self._mid_message = True
            try:
                envelope = parse_canonical(msg.payload)
                if not isinstance(envelope, dict):
                    raise InvalidInput("message is not an object")
                kind = envelope.get("kind")
                if kind == MSG_TX:
                    self._on_tx(envelope)
                elif kind == MSG_CUT:
                    self._on_cut(envelope)
                elif kind == MSG_VOTE:
                    self._on_vote(envelope)
                elif kind == MSG_IDLE:
                    self._on_idle(envelope)
                else:
                    raise InvalidInput(f"unknown message kind {kind!r}")
            except MedledgerError as exc:
                log.info("message %d ignored: %s", msg.seq, exc)
            self._mid_message = False
            self._next_seq = msg.seq + 1
            if not self._live and msg.seq >= self._replay_to:
                self._go_live()

    def _go_live(self) -> None:
        """The replay reached the stream's length at start: send the votes still owed."""
        self._live = True
        self._cut_wanted.set()
        for height, block_hash in sorted(self._unvoted.items()):
            cut = self._finality.cut(height)  # gone once final: then no vote is owed
            if cut is not None and cut.block.block_hash == block_hash:
                self._send_vote(cut.block.header, block_hash)
        self._unvoted.clear()

    def _on_tx(self, envelope: dict[str, Any]) -> None:
        # The envelope came through parse_canonical: its tx part is checked.
        tx = Transaction.from_checked_json(envelope.get("tx"))
        data = tx.encode()
        tx_hash = sha256(data)
        try:
            self._state.check(tx, tx_hash=tx_hash, size=len(data))
        except MedledgerError as exc:
            fut = self._waiters.pop(tx_hash, None)
            if fut is not None and not fut.done():
                fut.set_exception(exc)
            return
        self._state.apply(tx, tx_hash, self._tip_header.height + 1)
        p = self._pending
        p.txs.append((data, tx_hash))
        p.tx_times.append(tx.time_ms)
        p.size += len(data)
        if tx.type == ANCHOR:
            p.anchors.add_anchor(str(tx.body["institution"]), tx.time_ms)
        if p.first_seen is None:
            p.first_seen = self._monotonic()
            self._cut_wanted.set()
        params = self.genesis.params
        if (
            len(p.txs) >= params.max_block_txs
            or p.size >= params.max_block_bytes
            or self._rounds.round_complete(p.anchors)
        ):
            self._cut()
        elif tx.type == ANCHOR:
            self._rounds.anchor_ordered(p.anchors, self._tip_header.height, live=self._live)

    def _on_idle(self, envelope: dict[str, Any]) -> None:
        """Count a member's idle notice for the pending block; cut if it completes the round."""
        if self._rounds.count_notice(envelope, self._pending.anchors, self._tip_header.height + 1):
            self._cut()

    def notify_idle(self, *, anchor_on_the_way: bool = False) -> bool:
        """Say through the order that this member has nothing new to anchor at this slot.

        Called by the anchorer at a slot where the private chain has not grown
        since its newest anchor; ``anchor_on_the_way``: that anchor was sent but
        is not in the order yet. Returns whether a notice was sent: only where
        the genesis enables idle notices, once live, and while anchoring is
        active (:meth:`AnchorRounds.notify_idle
        <medledger.ledger.consortium.rounds.AnchorRounds.notify_idle>`).
        """
        return self._rounds.notify_idle(
            self._pending.anchors,
            self._tip_header.height,
            live=self._live,
            anchor_on_the_way=anchor_on_the_way,
        )

    def _on_cut(self, envelope: dict[str, Any]) -> None:
        height = envelope.get("height")
        if not isinstance(height, int):
            raise InvalidInput("cut marker needs an integer height")
        if height != self._tip_header.height + 1 or not self._pending.txs:
            # Every member whose timer fired sends a marker; once the first one cut the
            # block the others change nothing, so their signatures need no check.
            return
        # Only members may cut: an outsider's markers could split blocks at will.
        sig = Signature.from_json(envelope.get("signature"))
        # The members who may cut block h are those who vote on it: the members
        # after block h-1, whatever the pending transactions would change.
        member = self._members_before(height).by_fingerprint(sig.signer)
        if member is None:
            raise InvalidInput("cut marker not signed by a member")
        member.signing_key.verify(sig, _marker_bytes(self.chain_id, height))
        self._cut()

    def _members_before(self, height: int) -> MemberSet:
        """The members after block ``height - 1``: who votes on (and may cut) block ``height``."""
        previous = self._finality.cut(height - 1)
        return previous.state.members if previous is not None else self._finality.state.members

    def _cut(self) -> None:
        p = self._pending
        time_ms = self._next_block_time(p)
        self._pending = _Pending()
        self._rounds.block_cut(p.anchors)
        first_index = self._log.size
        block_log = CompactRange()
        nodes = []
        for data, _ in p.txs:
            leaf = leaf_hash(data)
            block_log.push(leaf)
            nodes.extend(self._log.append(leaf)[1:])
        header = BlockHeader(
            chain=self.chain_id,
            height=self._tip_header.height + 1,
            prev_hash=self._tip_hash,
            tx_root=block_log.root(),
            tx_count=len(p.txs),
            log_size=self._log.size,
            log_root=self._log.root(),
            time_ms=time_ms,
            proposer=self.genesis.consortium,
        )
        header_bytes = header.encode()
        block_hash = sha256(header_bytes)
        block = NewBlock(
            header=header,
            header_bytes=header_bytes,
            block_hash=block_hash,
            signatures=(),
            first_index=first_index,
            tx_data=[d for d, _ in p.txs],
            tx_hashes=[h for _, h in p.txs],
            nodes=nodes,
        )
        voters = self._members_before(header.height)
        self._finality.add_cut(Cut(block=block, members=voters, state=self._state.copy()))
        self._tip_header, self._tip_hash = header, block_hash
        self._rounds.after_cut(p.anchors, self._pending.anchors, header.height, live=self._live)
        if header.height <= self._finality.stored_height:
            # Stored means final: a quorum voted, no vote of ours is needed (and on a
            # divergence none may be sent).
            stored = self._store.block(header.height)
            if stored.block_hash != block_hash:
                self._diverged = f"block {header.height} differs from the stored final block"
                log.error("consortium divergence: %s", self._diverged)
        elif self._live:
            self._send_vote(header, block_hash)
        else:
            # Replaying: our vote may be further on in the order; see _go_live.
            self._unvoted[header.height] = block_hash
        self._broadcast_votes.block_cut(header.height)
        self._finality.try_finalize()

    def _send_vote(self, header: BlockHeader, block_hash: bytes) -> None:
        # The message id names the key, so a vote re-sent after a key rotation is not
        # swallowed by de-duplication of the old one.
        height = header.height
        vote = self._vote_message(header, block_hash)
        self._publish(
            vote,
            f"vote-{self.member_id}-{height}-{self._key.fingerprint[:16]}",
            needed=lambda: self._finality.height < height,
        )
        self._broadcast(vote)

    def _broadcast(self, payload: bytes) -> None:
        """Broadcast in the background, once: the ordered copy is the one that must arrive."""

        async def go() -> None:
            try:
                await self._orderer.broadcast(payload)
            except OrderingError as exc:
                log.debug("broadcast not sent: %s", exc)

        self._spawn(go())

    async def _listen_votes(self) -> None:
        """Count the votes broadcast beside the order (see module doc)."""
        async for payload in self._orderer.broadcasts():
            try:
                self._broadcast_votes.receive(
                    payload, tip_height=self._tip_header.height, final_height=self._finality.height
                )
            except Exception as exc:  # hostile input must not stop the listener
                # Anyone who reaches the transport can send here: one line, and only
                # at debug level, so a flood cannot flood the log.
                log.debug("broadcast ignored: %s: %s", type(exc).__name__, exc)

    def _next_block_time(self, pending: _Pending) -> int:
        """The next block's time from the readings seen so far in the stream (see module doc)."""
        voters = self._members_before(self._tip_header.height + 1)
        readings = [self._readings.get(m.id, self.genesis.time_ms) for m in voters.members]
        return block_time(
            self._tip_header.time_ms,
            readings,
            pending.tx_times,
            self.genesis.params.max_clock_skew_ms,
        )

    def _vote_message(self, header: BlockHeader, block_hash: bytes) -> bytes:
        # The header travels with the vote: the signature covers only the block
        # hash (the fixed format), and the header proves which height that is.
        # The clock reading is signed apart, over the height it comes with, so it
        # cannot be replayed into another height's vote.
        now = self._clock.now_ms()
        return canonical_bytes(
            {
                "kind": MSG_VOTE,
                "header": header.to_json(),
                "signature": self._key.sign(block_hash).to_json(),
                "time_ms": now,
                "clock": self._key.sign(clock_bytes(self.chain_id, header.height, now)).to_json(),
            }
        )

    def _clock_reading(self, envelope: dict[str, Any], member: Member, height: int) -> None:
        """Record the signed clock reading a vote carries.

        A vote without one still counts as a vote; it just reads nothing. The
        latest reading replaces the member's previous one, so a clock that was
        wrong and is fixed stops counting as wrong from its next vote.
        """
        if "time_ms" not in envelope and "clock" not in envelope:
            return
        time_ms = envelope.get("time_ms")
        if type(time_ms) is not int or time_ms < 0:
            raise InvalidInput("a vote's time_ms must be a non-negative integer")
        sig = Signature.from_json(envelope.get("clock"))
        if sig.signer != member.fingerprint:
            raise InvalidInput("a vote's clock reading must be signed by the voter")
        member.signing_key.verify(sig, clock_bytes(self.chain_id, height, time_ms))
        self._readings[member.id] = time_ms

    def _publish(self, payload: bytes, msg_id: str, *, needed: Callable[[], bool]) -> None:
        """Publish in the background; retry with backoff while ``needed()`` says so.

        A lost vote could stall finality for good (no member votes twice on
        its own), so an ordering outage of any length is waited out.
        """

        async def go() -> None:
            delay = _REPUBLISH_MIN_S
            failing = False
            while True:
                try:
                    await self._orderer.publish(msg_id, payload)
                except OrderingError as exc:
                    if not needed():
                        return
                    if not failing:
                        log.warning("publish %s failed, will retry: %s", msg_id, exc)
                        failing = True
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _REPUBLISH_MAX_S)
                    continue
                if failing:
                    log.warning("publish %s done after retrying", msg_id)
                return

        self._spawn(go())

    def _on_vote(self, envelope: dict[str, Any], *, ordered: bool = True) -> None:
        """Count a vote; ``ordered``: it came through the order (else broadcast beside it)."""
        header = BlockHeader.from_json(envelope.get("header"))
        if header.chain != self.chain_id or header.height < 1:
            raise InvalidInput("vote for a block of another chain or for genesis")
        height, block_hash = header.height, header.hash()
        sig = Signature.from_json(envelope.get("signature"))
        member = self._finality.voter(height, sig, block_hash)
        if ordered:
            if sig.signer == self._key.fingerprint:
                owed = self._unvoted.pop(height, None)
                if owed is not None and owed != block_hash:
                    # This key signed another block at this height before: never sign
                    # a second one (that would be equivocation).
                    self._diverged = f"this member voted for another block {height} before"
                    log.error("consortium divergence: %s", self._diverged)
            # Block time is a function of the order: readings come from ordered votes only.
            self._clock_reading(envelope, member, height)
        self._finality.count(member.id, header, block_hash, sig)

    def _members_changed(self, members: MemberSet) -> None:
        """A final block changed the member set: tell ``on_members_changed``, never raise."""
        if self.on_members_changed is not None:
            try:
                self.on_members_changed(members)
            except Exception:
                log.exception("reacting to a membership change failed")

    def _settle_waiters(self, block: NewBlock) -> None:
        """``block`` is final: each submitter waiting for one of its txs gets its receipt."""
        height, first = block.header.height, block.first_index
        for i, tx_hash in enumerate(block.tx_hashes):
            fut = self._waiters.pop(tx_hash, None)
            if fut is not None and not fut.done():
                fut.set_result(Receipt(height=height, index=first + i, tx_hash=tx_hash))

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coroutine`` in the background, until it ends or the member closes."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _cut_timer(self) -> None:
        """Send a cut marker once the oldest pending tx waited ``cut_after_ms`` (longer
        for a block of anchors alone: :meth:`AnchorRounds.marker_patience_s`).

        While something is pending it checks every half ``cut_after_ms``, so a
        non-anchor tx joining a block of anchors is cut on time. Sleeps until there is something to cut: an idle member must not wake
        hundreds of times a second (on a machine shared by several institutions
        that alone cost each a twentieth of a core).
        """
        period = self.genesis.params.cut_after_ms / 1000
        while True:
            p = self._pending
            if not (self._live and p.txs and not p.marker_sent and p.first_seen is not None):
                # No await between the check and the clear: nothing can set it in between.
                self._cut_wanted.clear()
                await self._cut_wanted.wait()
                continue
            patience = self._rounds.marker_patience_s(p.anchors, len(p.txs))
            wait = p.first_seen + patience - self._monotonic()
            if wait > 0:
                # At most half a period: the clock may be a test's, moved by hand.
                await asyncio.sleep(min(wait, period / 2))
                continue
            p.marker_sent = True
            height = self._tip_header.height + 1
            marker = canonical_bytes(
                {
                    "kind": MSG_CUT,
                    "height": height,
                    "signature": self._key.sign(_marker_bytes(self.chain_id, height)).to_json(),
                }
            )
            # One id per member: a squatter on a shared id could not stop the cut.
            self._send_until_cut(
                marker, f"cut-{self.genesis.consortium}-{height}-{self.member_id}", height
            )

    def _send_until_cut(self, payload: bytes, msg_id: str, height: int) -> None:
        """Publish a message that is needed until block ``height`` is cut (a marker, a notice)."""
        self._publish(payload, msg_id, needed=functools.partial(self._not_cut_yet, height))

    def _not_cut_yet(self, height: int) -> bool:
        return self._tip_header.height < height

    # -- views ------------------------------------------------------------------------------

    @property
    def final_height(self) -> int:
        return self._finality.height

    @property
    def state(self) -> ConsortiumState:
        """The state as of the last final block."""
        return self._finality.state

    def ordered_anchor(self, institution: str) -> AnchorRecord | None:
        """``institution``'s newest anchor in the order, final or not yet.

        Every tx in the order is applied in order by every member, and a block
        once cut becomes final unless the consortium diverged, so the next
        anchor may build on this one before it is final (ledger.anchoring).
        """
        return self._state.anchors.get(institution)

    @property
    def evidence(self) -> tuple[Evidence, ...]:
        return self._finality.evidence

    async def wait_final(self, height: int, timeout: float = 30.0) -> None:
        """Wait until ``height`` is final here."""
        await asyncio.wait_for(self._finality.until(height), timeout)

    def status(self) -> dict[str, Any]:
        return {
            "consortium": self.genesis.consortium,
            "member": self.member_id,
            "final_height": self._finality.height,
            "tip_height": self._tip_header.height,
            "members": [m.id for m in self._finality.state.members.members],
            "anchors": {k: a.to_json() for k, a in sorted(self._finality.state.anchors.items())},
            "evidence": [e.to_json() for e in self._finality.evidence],
            "diverged": self._diverged,
            "problems": {t.name: t.problem for t in self.tasks if t.problem is not None},
        }
