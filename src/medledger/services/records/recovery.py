"""Crash recovery: taking back versions indexed but never committed, and only those.

A write indexes its version before the chain commit, stamped with the chain's
durable height (``chain_base``), and takes it back if the commit fails. A
crash in between, or a take-back that failed (disk full), leaves a row whose
transaction may not be on the chain: :meth:`CrashRecovery.recover` finds
those from the index's recovery mark and deletes a row only when it is proven
uncommitted. The mark moves up as writes settle, so a restart re-checks only
the newest blocks.
"""

from __future__ import annotations

import asyncio
import logging

from medledger.core.errors import DamagedStore, MedledgerError, NotFound, RecordDamaged
from medledger.ledger.integrity import REPAIR_HINT, check_blocks
from medledger.services.keys import InstitutionKeys
from medledger.services.records.model import RecordChain, version_key
from medledger.services.records.reading import RecordReader
from medledger.services.search import resource_tokens
from medledger.storage.ports import BlobStore, RecordIndex, VersionRow

__all__ = ["CrashRecovery"]

log = logging.getLogger(__name__)


class CrashRecovery:
    """The recovery gate every operation passes, and the bookkeeping of unsettled writes."""

    def __init__(
        self,
        *,
        chain: RecordChain,
        index: RecordIndex,
        blobs: BlobStore,
        keys: InstitutionKeys,
        reader: RecordReader,
        enabled: bool = True,
        mark_every: int = 4096,
    ) -> None:
        """``enabled=False`` (a second service sharing another's index) neither stamps
        ``chain_base`` nor recovers. ``mark_every``: acknowledged writes between moves
        of the recovery mark."""
        self._chain = chain
        self._index = index
        self._blobs = blobs
        self._keys = keys
        self._reader = reader
        self.enabled = enabled
        # Every so many acknowledged writes the recovery mark moves up, so a crash
        # after a long run re-checks only the newest blocks.
        self.mark_every = mark_every
        self._since_mark = 0
        self._lock = asyncio.Lock()
        self._recovered = False
        self._refusal: str | None = None
        # Versions indexed but not yet committed or taken back (key -> chain_base), and
        # versions whose take-back failed (e.g. disk full): never settled by the mark.
        self._unsettled: dict[tuple[str, str, int], int] = {}
        self._stuck: dict[tuple[str, str, int], VersionRow] = {}

    # -- the gate --------------------------------------------------------------------------

    def refuse(self, reason: str) -> None:
        """From now on :meth:`ensure_recovered` raises :class:`DamagedStore` with ``reason``."""
        self._refusal = reason

    async def ensure_recovered(self) -> None:
        """Before an operation: refuse on a refused store, else :meth:`recover` (once)."""
        if self._refusal is not None:
            raise DamagedStore(self._refusal)
        if not self._recovered:
            async with self._lock:
                if not self._recovered:
                    await self.recover()
                    self._recovered = True

    async def recover(self) -> int:
        """Take back versions a crashed write indexed but never committed; returns how many.

        Every row a crash may have left has a ``chain_base`` at or above the
        index's recovery mark, so only those are looked at (no wall-clock
        window). A row is taken back only when that it was never committed is
        proven: every block above its ``chain_base`` re-derives intact from the
        stored bytes and none holds its transaction. A chain below a height the
        index saw durable, or damaged above the oldest such row, raises
        :class:`DamagedStore` and nothing is deleted.
        """
        if not self.enabled:
            return 0
        head = self._chain.durable_height
        candidates = [
            row
            for row in self._index.unsettled(self._index.recovery_mark())
            if version_key(row) not in self._unsettled
        ]
        orphans: list[VersionRow] = []
        if candidates:
            bases = [row.chain_base for row in candidates if row.chain_base is not None]
            if max(bases) > head:
                raise DamagedStore(
                    f"the private chain ends at height {head}, but record versions were"
                    f" indexed after block {max(bases)} was committed: acknowledged blocks"
                    f" were lost; {REPAIR_HINT}"
                )
            committed = await asyncio.to_thread(check_blocks, self._chain.store, min(bases) + 1)
            orphans = [
                row
                for row in candidates
                if row.tx_hash not in committed and not self._committed(row.tx_hash)
            ]
        if orphans:
            log.warning("taking back %d uncommitted record versions after a crash", len(orphans))
            await self.undo(orphans, [row.blob_hash for row in orphans])
        await self._settle_pending()
        await self._advance_mark(head)
        return len(orphans)

    async def _settle_pending(self) -> None:
        """Derive again the search tokens of committed versions a crash left pending
        (their tokens follow the acknowledgement: decision 0069)."""
        for rtype, rid, version in self._index.pending_tokens():
            row = self._index.get_version(rtype, rid, version)
            if row is None:
                continue  # taken back: its pending entry went with it
            tokens: set[bytes] = set()
            if not (row.erased or row.deleted):
                try:
                    resource = self._reader.open(row).resource()
                except RecordDamaged:
                    # Reported to the store's health by the reader; a version that cannot
                    # be opened cannot be searched for either.
                    log.error(
                        "%s/%s version %d is damaged: it gets no search tokens", *version_key(row)
                    )
                else:
                    tokens = resource_tokens(self._keys.search_key, resource, limit=None)
            await self._index.settle_tokens(row, tokens)

    # -- around each write -----------------------------------------------------------------

    async def before_write(self) -> None:
        """Settle what earlier failed take-backs left; now and then move the mark up."""
        if self._stuck:
            await self._settle_stuck()
        if self.enabled and self._since_mark >= self.mark_every:
            self._since_mark = 0
            try:
                await self._advance_mark(self._chain.durable_height)
            except MedledgerError as exc:
                log.warning("could not record the recovery mark: %s", exc)

    def indexing(self, row: VersionRow) -> None:
        """``row`` is about to be indexed: the mark must stay below it until it settles."""
        if row.chain_base is not None:
            self._unsettled[version_key(row)] = row.chain_base

    def acknowledged(self) -> None:
        """A write committed."""
        self._since_mark += 1

    def settled(self, rows: list[VersionRow]) -> None:
        """These rows were committed or taken back (or are left :meth:`stuck`)."""
        for row in rows:
            self._unsettled.pop(version_key(row), None)

    def stuck(self, rows: list[VersionRow]) -> None:
        """Their take-back failed: left for the next write (or the next start)."""
        self._stuck.update((version_key(row), row) for row in rows)

    async def undo(self, written: list[VersionRow], blob_hashes: list[bytes]) -> None:
        """Take back versions whose chain commit failed: rows, search tokens, blobs."""
        for row in reversed(written):
            await self._index.remove_version(row.resource_type, row.id, row.version)
            previous = self._index.latest(row.resource_type, row.id)
            tokens: set[bytes] = set()
            if previous is not None and not previous.erased:
                # The search index must describe the version that is current again.
                # Stored versions are indexed as they are, whatever the current bound.
                tokens = resource_tokens(
                    self._keys.search_key, self._reader.open(previous).resource(), limit=None
                )
            await self._index.set_tokens(row.resource_type, row.id, tokens)
        for blob_hash in blob_hashes:
            await asyncio.to_thread(self._blobs.delete, blob_hash)

    async def close(self) -> None:
        """Once every write settled, record it so the next start need not look again."""
        try:
            if self.enabled and self._recovered and self._refusal is None:
                await self._advance_mark(self._chain.durable_height)
        except MedledgerError as exc:
            log.warning("could not record the recovery mark: %s", exc)

    # -- internals -------------------------------------------------------------------------

    async def _settle_stuck(self) -> None:
        """Take back versions whose take-back failed before (their commit had failed)."""
        rows = sorted(self._stuck.values(), key=version_key)
        # A commit reported as failed may still have reached the disk: keep those.
        orphans = [row for row in rows if not self._committed(row.tx_hash)]
        try:
            await self.undo(orphans, [row.blob_hash for row in orphans])
        except MedledgerError as exc:
            log.warning(
                "%d uncommitted record versions still wait to be taken back: %s", len(orphans), exc
            )
            return
        self._stuck.clear()

    async def _advance_mark(self, head: int) -> None:
        """Move the recovery mark up to ``head``, below any version still unsettled."""
        floor = [head, *self._unsettled.values()]
        floor += [row.chain_base for row in self._stuck.values() if row.chain_base is not None]
        mark = min(floor)
        if mark > self._index.recovery_mark():
            await self._index.set_recovery_mark(mark)

    def _committed(self, tx_hash: bytes) -> bool:
        try:
            self._chain.store.tx_location(tx_hash)
        except NotFound:
            return False
        return True
