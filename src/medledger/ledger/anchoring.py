"""Anchoring: publish each institution's private-chain root on the consortium chain.

At every multiple of ``anchor_interval_ms`` (default 200 ms) on the wall clock,
when the private chain has grown, the institution submits an ``anchor`` tx — private height, log size, log root,
block hash and the RFC 6962 consistency proof from its previous final anchor —
signed with its member key. Every member checks the proof before the anchor
can be final, so once a root is anchored no one, including the institution,
can present a different history for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from medledger.core.errors import MedledgerError
from medledger.core.keys import SigningKey
from medledger.core.models import Receipt, Transaction
from medledger.core.transactions import ANCHOR
from medledger.ledger.clock import Clock, SystemClock
from medledger.ledger.consortium.member import ConsortiumMember
from medledger.ledger.private import PrivateChain
from medledger.ledger.proofs import consistency_proof
from medledger.ledger.supervision import SupervisedTask

__all__ = ["Anchorer"]

log = logging.getLogger(__name__)


class Anchorer:
    """Anchors one institution's private chain on the consortium chain."""

    def __init__(
        self,
        *,
        institution: str,
        chain: PrivateChain,
        member: ConsortiumMember,
        key: SigningKey,
        interval_ms: int | None = None,
        clock: Clock | None = None,
        when: Callable[[], bool] | None = None,
    ) -> None:
        """``when``: the background task anchors only once this says so (e.g. once the
        member has caught up with the order: before, it does not know its own last
        anchor and would submit anchors every member refuses)."""
        self._institution = institution
        self._chain = chain
        self._member = member
        self._key = key
        self._interval = (interval_ms or member.genesis.params.anchor_interval_ms) / 1000
        self._clock: Clock = clock or SystemClock()
        self._when = when
        #: The background anchoring task (see :meth:`start`).
        self.task = SupervisedTask("anchoring", self._run)

    def anchor_tx(self, *, after_size: int | None = None) -> Transaction | None:
        """The signed anchor for the current private head, or ``None`` if nothing is new.

        It extends this institution's newest anchor in the order, final or not
        (every member applies the order in the same sequence), so an anchor need
        not wait for the previous one to be final. ``after_size``: extend instead
        the anchor of that log size that was sent but is not in the order yet
        (it will be, before this one, or this one is refused and anchoring
        starts again from the order).
        """
        head = self._chain.head
        if after_size is None:
            prev = self._member.ordered_anchor(self._institution)
            prev_size = prev.log_size if prev is not None else 0
        else:
            prev_size = after_size
        if prev_size >= head.log_size:
            return None
        proof = consistency_proof(self._chain.store, prev_size, head.log_size) if prev_size else []
        unsigned = Transaction(
            type=ANCHOR,
            chain=self._member.chain_id,
            body={
                "institution": self._institution,
                "height": head.height,
                "log_size": head.log_size,
                "log_root": head.log_root.hex(),
                "block_hash": self._chain.head_hash.hex(),
                "prev_size": prev_size,
                "proof": [h.hex() for h in proof],
            },
            time_ms=self._clock.now_ms(),
        )
        return unsigned.signed_by(self._key)

    async def anchor_once(self) -> Receipt | None:
        """Anchor the current head now; returns where the anchor became final."""
        tx = self.anchor_tx()
        return None if tx is None else await self._member.submit(tx)

    def start(self) -> None:
        """Anchor every interval in a supervised background task (restarted if it dies)."""
        self.task.start()

    async def _run(self) -> None:
        if self._when is not None:
            while not self._when():
                await asyncio.sleep(0.05)
            self._when = None  # a restarted task need not wait again
            log.info(
                "caught up with the consortium; anchoring",
                extra={"fields": {"height": self._member.final_height}},
            )
        # Anchors are pipelined: the next is sent at the next multiple of the interval
        # without waiting for the previous one to be final (that took several round
        # trips, and a write waited for two of them). If the previous one is not even
        # in the order yet (at tens of ms between institutions its pass through the
        # replicated order can outlast an interval), the next builds on it rather
        # than skip the round: a skipped round cost the institution's records a whole
        # interval and left the round incomplete, to be cut by the timer and a
        # marker. At most two anchors are on their way: a third waits.
        pending: set[asyncio.Task[Receipt]] = set()
        sent_size = 0  # the log size of the newest anchor sent
        sent_prev = 0  # the log size that anchor built on
        failed: list[bool] = [False]

        def done(task: asyncio.Task[Receipt]) -> None:
            pending.discard(task)
            if _log_failure(task):
                failed[0] = True  # an anchor built on it would be refused too

        try:
            while True:
                ordered = self._member.ordered_anchor(self._institution)
                ordered_size = ordered.log_size if ordered is not None else 0
                if failed[0]:
                    failed[0], sent_size, sent_prev = False, 0, 0  # start again from the order
                tx: Transaction | None = None
                on_the_way = False  # builds on an anchor not in the order yet
                nothing_new = False  # the head is anchored (in the order, or on the way)
                try:
                    if ordered_size >= sent_size or not pending:
                        tx = self.anchor_tx()
                        nothing_new = tx is None
                    elif ordered_size >= sent_prev:
                        tx, on_the_way = self.anchor_tx(after_size=sent_size), True
                        nothing_new = tx is None
                except MedledgerError as exc:
                    log.warning("anchoring failed, will retry: %s", exc)
                if tx is not None:
                    sent_size, sent_prev = int(tx.body["log_size"]), int(tx.body["prev_size"])
                    submit = self._member.submit(tx, check_early=not on_the_way)
                    task = asyncio.get_running_loop().create_task(submit)
                    pending.add(task)
                    task.add_done_callback(done)
                elif nothing_new:
                    # The others' anchors for this slot go out now: say this member
                    # has none, so their block need not wait for the cut timer (0066).
                    self._member.notify_idle(anchor_on_the_way=on_the_way)
                await asyncio.sleep(self.next_anchor_delay_s())
        finally:
            for task in pending:
                task.cancel()

    def next_anchor_delay_s(self) -> float:
        """Seconds until the next multiple of the anchor interval on the wall clock.

        Every institution anchors at the same moments (their clocks agree within
        the consortium's skew bound), so one block collects the anchors of all
        of them: an anchor a block costs every member a cut, a vote round and a
        stored block each, and with N institutions anchoring out of step that is
        N blocks (N² vote checks in all) per interval instead of one.
        """
        interval_ms = self._interval * 1000
        return (interval_ms - self._clock.now_ms() % interval_ms) / 1000

    async def close(self) -> None:
        await self.task.close()


def _log_failure(task: asyncio.Task[Receipt]) -> bool:
    """Log a failed anchor; whether it failed."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("anchoring failed, will retry: %s", exc)
        return True
    return False
