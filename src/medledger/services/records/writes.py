"""Writing versions all-or-nothing: one index batch, one chain block, per-resource locks.

A write returns only after its chain commit is durable; if the commit fails,
what was indexed and stored is taken back (``recovery``).

The durable steps of a write, in order: the blobs and the index rows, at the
same time (neither is acknowledged, and a row whose transaction never reached
the chain is taken back, so either may land first); then, once both are
durable, the chain block naming them. The block is never written before the
blobs it names are durable (decision 0058).

The search tokens follow the acknowledgement (decision 0069): the row (with
the wrapped data key) is added as *pending*, and once the block is durable
the tokens are committed in the background. They are derived data: a crash
in between leaves the version pending, and recovery derives its tokens again
from the stored version. A search first waits for the versions pending when
it started (``RecordsService``), so a client that wrote and then searches
finds what it wrote, in this process or another.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from medledger.core.consent import PATIENT_KEY_SYSTEM
from medledger.core.errors import (
    Gone,
    InvalidInput,
    NotFound,
    PreconditionFailed,
    StaleKeys,
    StorageError,
    WriteRaced,
)
from medledger.core.models import Transaction
from medledger.core.transactions import RECORD_PUT
from medledger.services.fhir import FhirInvalid, Issue
from medledger.services.health import StoreHealth
from medledger.services.keys import InstitutionKeys
from medledger.services.records.model import (
    RecordChain,
    SealedCommit,
    SealedWrite,
    StoredResource,
    VersionCommitter,
    WriteIntent,
)
from medledger.services.records.reading import RecordReader, WriteInFlight
from medledger.services.records.recovery import CrashRecovery
from medledger.services.records.sealing import PreparedWrite, Sealer
from medledger.storage.ports import BlobStore, RecordIndex, VersionRow

__all__ = ["RecordWriter"]

log = logging.getLogger(__name__)

#: How often a worker's write is sealed again after another worker wrote the resource first.
_RACE_RETRIES = 3


class RecordWriter:
    """Writes versions; holds the per-resource locks erasure shares."""

    def __init__(
        self,
        *,
        chain: RecordChain,
        index: RecordIndex,
        keys: InstitutionKeys,
        sealer: Sealer,
        recovery: CrashRecovery,
        reader: RecordReader,
        health: StoreHealth,
        blobs: BlobStore | None = None,
        remote: VersionCommitter | None = None,
    ) -> None:
        """``remote``: in an API worker, the sequencer process that indexes and commits
        what this process sealed; ``blobs``: where :meth:`commit_sealed` finds the blobs."""
        self._chain = chain
        self._blobs = blobs
        self._remote = remote
        self._index = index
        self._keys = keys
        self._sealer = sealer
        self._recovery = recovery
        self._reader = reader
        self._health = health
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        # Writes in flight per KEK id: key rotation waits for the old KEK's to land.
        self.inflight: Counter[str] = Counter()
        # Tokens of acknowledged versions being committed, and those whose commit failed
        # (retried before the next write, a search, or the close).
        self._settling: set[asyncio.Task[None]] = set()
        self._unsettled: dict[tuple[str, str, int], tuple[VersionRow, set[bytes]]] = {}

    def lock(self, resource_type: str, rid: str) -> asyncio.Lock:
        """The lock every write or erasure of this resource holds."""
        return self._locks.setdefault((resource_type, rid), asyncio.Lock())

    def writing(self, resource_type: str, rid: str) -> bool:
        """Whether a write or erasure of this resource is in progress (its lock is held).

        Read from the store check's thread: a momentary answer, which is all it needs.
        """
        lock = self._locks.get((resource_type, rid))
        return lock is not None and lock.locked()

    async def write_many(self, intents: Sequence[WriteIntent]) -> list[StoredResource]:
        """Write several versions all-or-nothing: one index batch, one chain block.

        The resources are already validated. A ``create`` of an existing id, or
        an ``if_match`` that is not the current version, raises
        :class:`PreconditionFailed` and nothing is written.

        In an API worker (``remote`` given) the versions are sealed here and
        committed by the sequencer process (:meth:`commit_sealed` there); when
        another worker wrote one of the resources in between, the sequencer
        refuses with :class:`WriteRaced` and the write is sealed again on the
        newer version (a few times at most).
        """
        for attempt in range(_RACE_RETRIES + 1):
            try:
                return await self._write_once(intents)
            except WriteRaced:
                if attempt == _RACE_RETRIES:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def settle_tokens(self) -> None:
        """Wait for this process's token commits in flight; retry those that failed.

        Raises the storage error of a retry that fails again (the versions stay pending).
        """
        if self._settling:
            await asyncio.gather(*list(self._settling), return_exceptions=True)
        if not self._unsettled:
            return
        retry = list(self._unsettled.values())
        self._unsettled.clear()
        await self._settle(retry)
        if self._unsettled:
            count = len(self._unsettled)
            raise StorageError(f"the search tokens of {count} versions could not be stored")
        self._health.write_succeeded()

    def _settle_later(self, versions: Sequence[tuple[VersionRow, set[bytes]]]) -> None:
        """Commit acknowledged versions' tokens in the background."""
        task = asyncio.get_running_loop().create_task(self._settle(versions))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, versions: Sequence[tuple[VersionRow, set[bytes]]]) -> None:
        outcomes = await asyncio.gather(
            *(self._index.settle_tokens(row, tokens) for row, tokens in versions),
            return_exceptions=True,
        )
        for (row, tokens), outcome in zip(versions, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                # Left pending: searches wait for it; retried before the next write.
                self._unsettled[(row.resource_type, row.id, row.version)] = (row, tokens)
                log.warning("search tokens of a version not stored yet: %s", outcome)
                if isinstance(outcome, StorageError):
                    self._health.write_failed(outcome)  # a full disk: /readyz says so

    async def _write_once(self, intents: Sequence[WriteIntent]) -> list[StoredResource]:
        await self._recovery.ensure_recovered()
        if self._unsettled:
            with contextlib.suppress(StorageError):  # reported by the search that waits
                await self.settle_tokens()
        keys = sorted({(i.resource_type, i.id) for i in intents})
        if len(keys) != len(intents):
            raise FhirInvalid(
                [
                    Issue(
                        severity="error",
                        code="business-rule",
                        diagnostics="the same resource is written twice in one request",
                    )
                ]
            )
        locks = [self.lock(*k) for k in keys]
        for lock in locks:
            await lock.acquire()
        await self._recovery.before_write()
        kek_id, kek = self._keys.current_kek()
        self.inflight[kek_id] += 1
        written: list[VersionRow] = []
        sealed: list[SealedWrite] = []
        handed_over = False
        try:
            # Calls, not coroutines: a precondition failing halfway leaves none unawaited.
            pending: list[Callable[[], Awaitable[PreparedWrite]]] = []
            for intent in intents:
                rtype, rid = intent.resource_type, intent.id
                latest = self._index.latest(rtype, rid)
                if intent.create and latest is not None:
                    raise PreconditionFailed(f"{rtype}/{rid} already exists")
                current = latest.version if latest is not None else 0
                if intent.if_match is not None and intent.if_match != current:
                    raise PreconditionFailed(
                        f"{rtype}/{rid} is at version {current}, not {intent.if_match}"
                    )
                if intent.delete:
                    pending.append(partial(self._tombstone, rtype, rid, latest, kek_id, kek))
                    continue
                self._keep_reserved(rtype, intent.resource, latest)
                pending.append(
                    partial(
                        self._sealer.prepare, rtype, rid, current + 1, intent.resource, kek_id, kek
                    )
                )
            # Every outcome is collected first, so none is left unawaited when one fails.
            prepared_or_failed = await asyncio.gather(
                *(prepare() for prepare in pending), return_exceptions=True
            )
            _raise_first(prepared_or_failed)  # nothing is stored yet
            prepared = [v for v in prepared_or_failed if isinstance(v, PreparedWrite)]
            if self._remote is not None:
                stored = await asyncio.gather(
                    *(self._sealer.store(v) for v in prepared), return_exceptions=True
                )
                sealed.extend(v.sealed for v, r in zip(prepared, stored, strict=True) if r is None)
                _raise_first(stored)
                # From here the sequencer owns the blobs: it takes them back when it refuses
                # or fails the commit, and a lost answer may mean committed (the store
                # scrub removes blobs nothing refers to).
                handed_over = True
                await self._remote.commit_versions(sealed)
            else:
                # Any of these blobs may be stored from here on; taking back one that was
                # not is harmless (a blob's hash is unique to its version).
                sealed.extend(v.sealed for v in prepared)
                await self._store_index_and_commit(prepared, written)
            self._health.write_succeeded()
            return [version.stored for version in sealed]
        except BaseException as exc:
            if isinstance(exc, StorageError) and not handed_over:
                self._health.write_failed(exc)
            if not handed_over:
                try:
                    await self._recovery.undo(
                        written, [version.row.blob_hash for version in sealed]
                    )
                except BaseException:
                    self._recovery.stuck(written)
                    raise
            raise
        finally:
            self._recovery.settled([version.row for version in sealed])
            self.inflight[kek_id] -= 1
            for lock in locks:
                lock.release()

    async def _store_index_and_commit(
        self, prepared: Sequence[PreparedWrite], written: list[VersionRow]
    ) -> None:
        """Store the blobs and index the rows at the same time, then commit the transactions
        in one block once both are durable; the tokens follow (module docstring).

        All at once: the blobs of a large transaction share file-system flushes
        and its rows share index commits (one by one, a 3,000-entry Bundle took
        minutes), and the index commit overlaps the blob flush instead of
        following it. ``written`` collects the rows indexed, for the caller's
        take-back on failure. Every outcome is collected before raising, so
        what was stored is known when one fails.
        """
        for version in prepared:
            self._recovery.indexing(version.sealed.row)
        rows = [(v.sealed.row, v.sealed.tokens) for v in prepared]
        outcomes = await asyncio.gather(
            *(self._sealer.store(v) for v in prepared),
            *(self._index.put_version(row, None) for row, _ in rows),
            return_exceptions=True,
        )
        indexed = outcomes[len(prepared) :]
        written.extend(row for (row, _), r in zip(rows, indexed, strict=True) if r is None)
        _raise_first(outcomes)
        # Only now: a block must never name a blob that is not durable.
        await self._chain.submit_many([v.sealed.tx for v in prepared])
        self._recovery.acknowledged()
        self._settle_later(rows)

    async def _index_and_commit(
        self,
        versions: Sequence[tuple[VersionRow, set[bytes]]],
        txs: Sequence[Transaction],
        written: list[VersionRow],
    ) -> None:
        """Index the sealed versions, then commit their transactions in one block; the
        tokens follow (module docstring).

        ``written`` collects the rows indexed, for the caller's take-back on failure.
        """
        for row, _ in versions:
            self._recovery.indexing(row)
        indexed = await asyncio.gather(
            *(self._index.put_version(row, None) for row, _ in versions),
            return_exceptions=True,
        )
        written.extend(row for (row, _), r in zip(versions, indexed, strict=True) if r is None)
        _raise_first(indexed)
        await self._chain.submit_many(txs)
        self._recovery.acknowledged()
        self._settle_later(versions)

    async def commit_sealed(self, sealed: Sequence[SealedCommit]) -> None:
        """The sequencer's half of a worker's write: check, index and commit versions sealed
        by an API worker (``services.sequencer_link``), or take their blobs back.

        Under this process's per-resource locks each version must be the next one
        of its resource (else :class:`WriteRaced`: another worker wrote it first),
        sealed under the current KEK (else :class:`StaleKeys`), with its blob
        stored. ``chain_base`` is stamped here, from the chain this process writes.
        Nothing is written when a check fails; the blobs are taken back.
        """
        keys = sorted({(v.row.resource_type, v.row.id) for v in sealed})
        blob_hashes = [version.row.blob_hash for version in sealed]
        if len(keys) != len(sealed):
            await self._recovery.undo([], blob_hashes)
            raise InvalidInput("the same resource is written twice in one commit")
        locks = [self.lock(*k) for k in keys]
        for lock in locks:
            await lock.acquire()
        written: list[VersionRow] = []
        stamped: list[SealedCommit] = []
        kek_id = ""
        counted = False
        try:
            await self._recovery.ensure_recovered()
            await self._recovery.before_write()
            kek_id = self._keys.current_kek()[0]
            self.inflight[kek_id] += 1
            counted = True
            base = self._chain.durable_height if self._recovery.enabled else None
            for version in sealed:
                row = version.row
                _check_sealed(version, self._chain.chain_id)
                latest = self._index.latest(row.resource_type, row.id)
                current = latest.version if latest is not None else 0
                if row.version != current + 1:
                    raise WriteRaced(f"{row.resource_type}/{row.id} is at version {current} now")
                if row.kek_id != kek_id:
                    raise StaleKeys("the key-encryption key changed; the worker restarts")
                if not await asyncio.to_thread(self._blob_exists, row.blob_hash):
                    raise InvalidInput("a sealed version's blob is not stored")
                stamped.append(replace(version, row=replace(row, chain_base=base)))
            await self._index_and_commit(
                [(v.row, v.tokens) for v in stamped], [v.tx for v in stamped], written
            )
            self._health.write_succeeded()
        except BaseException as exc:
            if isinstance(exc, StorageError):
                self._health.write_failed(exc)
            try:
                await self._recovery.undo(written, blob_hashes)
            except BaseException:
                self._recovery.stuck(written)
                raise
            raise
        finally:
            self._recovery.settled([version.row for version in stamped])
            if counted:
                self.inflight[kek_id] -= 1
            for lock in locks:
                lock.release()

    def _blob_exists(self, blob_hash: bytes) -> bool:
        return self._blobs is not None and self._blobs.exists(blob_hash)

    async def _tombstone(
        self, rtype: str, rid: str, latest: VersionRow | None, kek_id: str, kek: bytes
    ) -> PreparedWrite:
        """The version that deletes ``rtype/rid`` (which must exist and be live)."""
        if latest is None:
            raise NotFound(f"{rtype}/{rid} does not exist")
        if latest.erased:
            raise Gone(f"{rtype}/{rid} was erased")
        if latest.deleted:
            raise Gone(f"{rtype}/{rid} is already deleted")
        return await self._sealer.prepare(
            rtype, rid, latest.version + 1, {}, kek_id, kek, deletion_of=latest
        )

    def _keep_reserved(
        self, rtype: str, resource: dict[str, Any], latest: VersionRow | None
    ) -> None:
        """Refuse a write that sets, changes or removes a patient-key identifier.

        The link between a Patient and a wallet key is made only by enrollment
        (``services.enrollment``); a FHIR write must not look like one. Versions
        stored before the system was reserved may carry it: a write keeping
        exactly what the current version has is accepted.
        """
        new = _reserved_entries(resource)
        old: list[bytes] = []
        if latest is not None and not latest.erased and (new or rtype == "Patient"):
            try:  # on the event loop: never wait here for another process's write
                current = self._reader.open(latest, wait=False)
            except WriteInFlight:
                # Another worker's version of it is not committed yet: a race, sealed again.
                raise WriteRaced(f"{rtype} version {latest.version} is being written") from None
            old = _reserved_entries(current.resource())
        if new != old:
            raise FhirInvalid(
                [
                    Issue(
                        severity="error",
                        code="business-rule",
                        diagnostics=f"identifier system {PATIENT_KEY_SYSTEM} is reserved: a "
                        "patient's key is linked only by enrollment ($enroll)",
                        expression=(f"{rtype}.identifier",),
                    )
                ]
            )


def _check_sealed(version: SealedCommit, chain_id: str) -> None:
    """A worker's sealed version must be a ``record.put`` on this chain that names its row."""
    row, tx = version.row, version.tx
    body = tx.body
    if (
        tx.type != RECORD_PUT
        or tx.chain != chain_id
        or tx.signatures
        or tx.hash() != row.tx_hash
        or body.get("resource_type") != row.resource_type
        or body.get("version") != row.version
        or body.get("blob") != row.blob_hash.hex()
        or body.get("patient") != row.patient
        or row.erased
    ):
        raise InvalidInput("a sealed version does not match its transaction")


def _raise_first(outcomes: Sequence[object]) -> None:
    """Raise the first exception among gathered outcomes (cancellation included)."""
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


def _reserved_entries(value: Any) -> list[bytes]:
    """Every object anywhere in ``value`` whose ``system`` is the reserved patient-key system."""
    found: list[bytes] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("system") == PATIENT_KEY_SYSTEM:
                found.append(json.dumps(item, sort_keys=True, default=str).encode())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return sorted(found)
