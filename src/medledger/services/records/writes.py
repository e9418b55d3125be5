"""Writing versions all-or-nothing: one index batch, one chain block, per-resource locks.

A write returns only after its chain commit is durable; if the commit fails,
what was indexed and stored is taken back (``recovery``).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from medledger.core.consent import PATIENT_KEY_SYSTEM
from medledger.core.errors import Gone, NotFound, PreconditionFailed, StorageError
from medledger.services.fhir import FhirInvalid, Issue
from medledger.services.health import StoreHealth
from medledger.services.keys import InstitutionKeys
from medledger.services.records.model import (
    RecordChain,
    SealedWrite,
    StoredResource,
    WriteIntent,
)
from medledger.services.records.reading import RecordReader
from medledger.services.records.recovery import CrashRecovery
from medledger.services.records.sealing import Sealer
from medledger.storage.ports import RecordIndex, VersionRow

__all__ = ["RecordWriter"]


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
    ) -> None:
        self._chain = chain
        self._index = index
        self._keys = keys
        self._sealer = sealer
        self._recovery = recovery
        self._reader = reader
        self._health = health
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        # Writes in flight per KEK id: key rotation waits for the old KEK's to land.
        self.inflight: Counter[str] = Counter()

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
        """
        await self._recovery.ensure_recovered()
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
        try:
            # Calls, not coroutines: a precondition failing halfway leaves none unawaited.
            pending: list[Callable[[], Awaitable[SealedWrite]]] = []
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
                        self._sealer.seal, rtype, rid, current + 1, intent.resource, kek_id, kek
                    )
                )
            # All at once: the blobs of a large transaction share file-system flushes and
            # its rows share index commits (one by one, a 3,000-entry Bundle took minutes).
            # Every outcome is collected first, so what was stored is known when one fails.
            sealed_or_failed = await asyncio.gather(
                *(seal() for seal in pending), return_exceptions=True
            )
            sealed.extend(v for v in sealed_or_failed if isinstance(v, SealedWrite))
            _raise_first(sealed_or_failed)
            for version in sealed:
                self._recovery.indexing(version.row)
            indexed = await asyncio.gather(
                *(self._index.put_version(v.row, v.tokens) for v in sealed),
                return_exceptions=True,
            )
            written.extend(v.row for v, r in zip(sealed, indexed, strict=True) if r is None)
            _raise_first(indexed)
            await self._chain.submit_many([version.tx for version in sealed])
            self._recovery.acknowledged()
            self._health.write_succeeded()
            return [version.stored for version in sealed]
        except BaseException as exc:
            if isinstance(exc, StorageError):
                self._health.write_failed(exc)
            try:
                await self._recovery.undo(written, [version.row.blob_hash for version in sealed])
            except BaseException:
                self._recovery.stuck(written)
                raise
            raise
        finally:
            self._recovery.settled([version.row for version in sealed])
            self.inflight[kek_id] -= 1
            for lock in locks:
                lock.release()

    async def _tombstone(
        self, rtype: str, rid: str, latest: VersionRow | None, kek_id: str, kek: bytes
    ) -> SealedWrite:
        """The version that deletes ``rtype/rid`` (which must exist and be live)."""
        if latest is None:
            raise NotFound(f"{rtype}/{rid} does not exist")
        if latest.erased:
            raise Gone(f"{rtype}/{rid} was erased")
        if latest.deleted:
            raise Gone(f"{rtype}/{rid} is already deleted")
        return await self._sealer.seal(
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
            old = _reserved_entries(self._reader.open(latest).resource())
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
