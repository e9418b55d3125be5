"""The access trail: every read of a record, allowed or refused, is an ``access`` tx.

* On the private chain of the institution that served or refused the read,
  and — for cross-institution reads — on the reader's private chain too.
* For cross-institution reads the holder also submits a summary ``access``
  tx to the consortium, so the patient's trail survives any one institution.

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
from medledger.ledger.consortium_rules import ACCESS
from medledger.ledger.private import PrivateChain
from medledger.storage.ports import ChainStore

__all__ = ["AccessEntry", "AccessLog", "read_trail"]

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

    def consortium_body(self) -> dict[str, Any]:
        return {
            "reader": self.reader,
            "holder": self.holder,
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
        self._background: set[asyncio.Task[None]] = set()

    async def record(self, entry: AccessEntry, *, summarize: bool = False) -> None:
        """Append ``entry`` to the private chain (durable on return).

        With ``summarize`` (the holder of a cross-institution read) a summary
        is also submitted to the consortium in the background: a read must not
        wait for consortium finality, and a lost summary is logged and retried
        by the consortium member's own resubmission.
        """
        await self._chain.submit(ACCESS, entry.private_body())
        if summarize and self._member is not None:
            task = asyncio.create_task(self._summarize(entry), name="medledger-access-summary")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _summarize(self, entry: AccessEntry) -> None:
        assert self._member is not None
        unsigned = Transaction(
            type=ACCESS,
            chain=self._member.chain_id,
            body=entry.consortium_body(),
            time_ms=self._clock.now_ms(),
        )
        tx = self._member.sign(unsigned)
        for attempt in range(3):
            try:
                await self._member.submit(tx, timeout=30)
                return
            except MedledgerError as exc:
                log.warning("consortium access summary not accepted (try %d): %s", attempt + 1, exc)
                await asyncio.sleep(0.5 * (attempt + 1))

    async def drain(self) -> None:
        """Wait for consortium summaries in flight (before closing)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def read_trail(store: ChainStore, patients: set[str]) -> list[dict[str, Any]]:
    """Access and consent txs of ``patients`` on one chain, oldest first.

    Each item: ``{"chain", "height", "time_ms", "type", **body}``.
    """
    out: list[dict[str, Any]] = []
    for block in store.iter_blocks(1):
        for data in block.tx_data:
            tx = Transaction.decode(data)
            relevant = tx.type.startswith("consent.") or tx.type == ACCESS
            if relevant and tx.body.get("patient") in patients:
                item = {"chain": tx.chain, "height": block.height, "time_ms": tx.time_ms}
                item["type"] = tx.type
                item.update({k: v for k, v in tx.body.items() if k != "patient_key"})
                if tx.type == "consent.grant":
                    item["consent"] = tx.hash().hex()
                out.append(item)
    return out
