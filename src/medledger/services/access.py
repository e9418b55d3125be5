"""The access trail: every read of a record, allowed or refused, is an ``access`` tx.

* On the private chain of the institution that served or refused the read,
  and — for cross-institution reads — on the reader's private chain too.
* For cross-institution reads the holder also reports a summary to the
  consortium, so the patient's trail survives any one institution. Summaries
  go out as ``access.batch`` txs: whatever accumulated while the previous
  batch became final goes in the next one (group commit), so a busy holder
  costs the consortium one signed tx per batch rather than one per read.

Bodies hold only member ids, pseudonyms (patient key fingerprints or keyed
hashes), keyed record references and hashes: never a resource id, a name or
any other PHI. ``reason`` is one of medledger's own refusal messages, which
name no patient data.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from medledger.core.errors import MedledgerError
from medledger.core.models import Transaction
from medledger.ledger.clock import Clock, SystemClock
from medledger.ledger.consortium import ConsortiumMember
from medledger.ledger.consortium_rules import ACCESS, ACCESS_BATCH, MAX_ACCESS_BATCH
from medledger.ledger.private import PrivateChain

__all__ = ["AccessEntry", "AccessLog"]

log = logging.getLogger(__name__)
ALLOWED, REFUSED = "allowed", "refused"


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessEntry:
    """One access as written on a chain."""

    reader: str
    holder: str
    patient: str
    consent: str
    resource: str
    outcome: str
    reason: str = ""
    actor: str = ""
    request: str = ""

    def private_body(self) -> dict[str, Any]:
        return {
            "reader": self.reader,
            "holder": self.holder,
            "patient": self.patient,
            "consent": self.consent,
            "resource": self.resource,
            "outcome": self.outcome,
            "reason": self.reason,
            "actor": self.actor,
            "request": self.request,
        }

    def summary(self) -> dict[str, Any]:
        """One ``access.batch`` entry: no holder (the batch names it), reason, actor or request."""
        return {
            "reader": self.reader,
            "patient": self.patient,
            "consent": self.consent,
            "resource": self.resource,
            "outcome": self.outcome,
        }


class AccessLog:
    """Writes access entries of one institution (see module docstring)."""

    def __init__(
        self,
        *,
        institution: str,
        chain: PrivateChain,
        member: ConsortiumMember | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._institution = institution
        self._chain = chain
        self._member = member
        self._clock: Clock = clock or SystemClock()
        self._unreported: list[AccessEntry] = []
        self._reporter: asyncio.Task[None] | None = None
        self._reporter_died: str | None = None

    async def record(self, entry: AccessEntry, *, summarize: bool = False) -> None:
        """Append ``entry`` to the private chain (durable on return).

        With ``summarize`` (the holder of a cross-institution read) a summary
        is also reported to the consortium in the background, batched: a read
        must not wait for consortium finality. A batch the consortium does not
        accept is logged and retried.
        """
        await self._chain.submit(ACCESS, entry.private_body())
        if summarize and self._member is not None:
            self._unreported.append(entry)
            if self._reporter is None or self._reporter.done():
                self._reporter = asyncio.create_task(
                    self._report(), name="medledger-access-summaries"
                )
                self._reporter.add_done_callback(self._reporter_done)

    def _reporter_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self._reporter_died = None
            return
        # The next summarized read starts a new reporter; until one finishes,
        # the node is not ready (its consortium access trail is falling behind).
        self._reporter_died = (
            f"died: {type(exc).__name__}: {exc} ({len(self._unreported)} unreported)"
        )
        log.error("access summary reporter %s", self._reporter_died, exc_info=exc)

    def problem(self) -> str | None:
        """Health check: why the last access-summary reporter died, until one succeeds."""
        return self._reporter_died

    async def record_many(self, entries: list[AccessEntry]) -> None:
        """Append several entries (one read of many resources) in one atomic commit."""
        if entries:
            await self._chain.submit_many(
                [
                    Transaction(
                        type=ACCESS,
                        chain=self._chain.chain_id,
                        body=e.private_body(),
                        time_ms=self._clock.now_ms(),
                    )
                    for e in entries
                ]
            )

    async def _report(self) -> None:
        """Submit the unreported summaries, a batch at a time, until none are left."""
        while self._unreported:
            batch = self._unreported[:MAX_ACCESS_BATCH]
            del self._unreported[:MAX_ACCESS_BATCH]
            await self._submit_batch(batch)

    async def _submit_batch(self, batch: list[AccessEntry]) -> None:
        assert self._member is not None
        unsigned = Transaction(
            type=ACCESS_BATCH,
            chain=self._member.chain_id,
            body={"holder": self._institution, "entries": [e.summary() for e in batch]},
            time_ms=self._clock.now_ms(),
        )
        tx = self._member.sign(unsigned)
        for attempt in range(3):
            try:
                await self._member.submit(tx, timeout=30)
                return
            except MedledgerError as exc:
                log.warning(
                    "consortium access summaries not accepted (try %d, %d entries): %s",
                    attempt + 1,
                    len(batch),
                    exc,
                )
                await asyncio.sleep(0.5 * (attempt + 1))

    async def drain(self) -> None:
        """Wait until every summary recorded so far has been submitted (before closing)."""
        while self._reporter is not None and not self._reporter.done():
            await asyncio.gather(self._reporter, return_exceptions=True)
