"""The records service of one institution: the parts of this package composed into one API."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

from medledger.core.errors import MedledgerError, StorageError
from medledger.core.models import Transaction
from medledger.ledger.clock import Clock, SystemClock
from medledger.services.conditional import ConditionalWrites
from medledger.services.fhir import FhirInvalid, Issue, validate_id
from medledger.services.health import StoreHealth
from medledger.services.history import current_during
from medledger.services.keys import InstitutionKeys
from medledger.services.records.bundles import BundleContext, apply_batch, apply_transaction
from medledger.services.records.erasure import RecordEraser
from medledger.services.records.model import (
    RecordChain,
    SealedCommit,
    SealedVersion,
    StoredResource,
    VersionCommitter,
    VersionInfo,
    WriteIntent,
)
from medledger.services.records.patients import PatientRecords
from medledger.services.records.queries import RecordSearch
from medledger.services.records.reading import RecordReader, WriteInFlight
from medledger.services.records.recovery import CrashRecovery
from medledger.services.records.reindex import Reindexer, ReindexReport
from medledger.services.records.rotation import rotate_kek
from medledger.services.records.sealing import Sealer
from medledger.services.records.writes import RecordWriter
from medledger.services.validation import Validator
from medledger.storage.ports import BlobStore, RecordIndex, VersionRow

__all__ = ["RecordsService"]

T = TypeVar("T")

#: Longest a search waits for the tokens of versions acknowledged before it (decision 0069).
TOKENS_WAIT_S = 10.0


def _current_during(rows: Sequence[VersionRow], period: tuple[int, int]) -> list[VersionRow]:
    """Of ``rows`` (newest first, every version of each resource), those current at some
    moment of ``[start, end)``: each resource's versions, as ``services.history`` decides."""
    by_resource: dict[tuple[str, str], list[VersionRow]] = {}
    for row in rows:
        by_resource.setdefault((row.resource_type, row.id), []).append(row)
    kept: set[tuple[str, str, int]] = set()
    for versions in by_resource.values():
        versions.sort(key=lambda r: r.version, reverse=True)
        for row in current_during(versions, [r.updated_ms for r in versions], period):
            kept.add((row.resource_type, row.id, row.version))
    return [r for r in rows if (r.resource_type, r.id, r.version) in kept]


class RecordsService:
    """Create, update, read, history, search and erase FHIR resources of one institution.

    Every operation first passes the crash-recovery gate (``recovery``): the
    first one runs recovery, and on a store refused as damaged each one raises
    :class:`DamagedStore`.
    """

    def __init__(
        self,
        *,
        institution: str,
        chain: RecordChain,
        index: RecordIndex,
        blobs: BlobStore,
        keys: InstitutionKeys,
        clock: Clock | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
        validator: Validator | None = None,
        sign_tx: Callable[[Transaction], Transaction] | None = None,
        crash_recovery: bool = True,
        recovery_mark_every: int = 4096,
        health: StoreHealth | None = None,
        remote: VersionCommitter | None = None,
    ) -> None:
        """``crash_recovery=False`` (a second service sharing another's index, as the
        consortium-only benchmark mode does) neither records ``chain_base`` nor recovers.
        ``recovery_mark_every``: acknowledged writes between moves of the recovery mark.
        ``sign_tx``: only the consortium-only benchmark mode signs record transactions.
        ``remote``: in an API worker, the sequencer that indexes and commits the versions
        this process seals (``services.sequencer_link``)."""
        # Failed writes (disk full) and damaged reads are reported here for /readyz, /metrics.
        self.health = health or StoreHealth(None)
        self._chain = chain
        self._index = index
        self._keys = keys
        self._random = random_bytes
        self._validator = validator or Validator()
        self.reader = RecordReader(
            institution=institution,
            chain=chain,
            index=index,
            blobs=blobs,
            keys=keys,
            health=self.health,
        )
        self.recovery = CrashRecovery(
            chain=chain,
            index=index,
            blobs=blobs,
            keys=keys,
            reader=self.reader,
            enabled=crash_recovery,
            mark_every=recovery_mark_every,
        )
        self._clock: Clock = clock or SystemClock()
        self._sealer = Sealer(
            institution=institution,
            chain=chain,
            blobs=blobs,
            keys=keys,
            clock=self._clock,
            random_bytes=random_bytes,
            sign_tx=sign_tx,
            stamp_chain_base=crash_recovery,
        )
        self._writer = RecordWriter(
            chain=chain,
            index=index,
            keys=keys,
            sealer=self._sealer,
            recovery=self.recovery,
            reader=self.reader,
            health=self.health,
            blobs=blobs,
            remote=remote,
        )
        self._eraser = RecordEraser(
            chain=chain, index=index, blobs=blobs, keys=keys, writer=self._writer
        )
        self._search = RecordSearch(index=index, keys=keys, reader=self.reader, clock=self._clock)
        #: Conditional writes' search-then-write, one step per type (also for Bundles).
        self.conditional = ConditionalWrites(self)
        self._patients = PatientRecords(index=index, keys=keys)
        #: Rebuilds the search tokens when this code's terms differ from the index's.
        self.reindexer = Reindexer(
            index=index, keys=keys, reader=self.reader, lock=self._writer.lock
        )

    # -- writing ---------------------------------------------------------------------------

    async def create(self, resource: Mapping[str, Any]) -> StoredResource:
        """Store a new resource under a server-assigned id; returns version 1."""
        body = _object(resource)
        await self._validator.validate(body)
        intent = WriteIntent(
            resource_type=str(body["resourceType"]),
            id=str(uuid.uuid4()),
            resource=body,
            create=True,
        )
        return (await self._writer.write_many([intent]))[0]

    async def update(
        self,
        resource_type: str,
        rid: str,
        resource: Mapping[str, Any],
        *,
        if_match: int | None = None,
    ) -> tuple[StoredResource, bool]:
        """Store a new version (or the first, update-as-create); returns it and whether it was created.

        ``if_match`` is the version the client last saw; a different current
        version raises :class:`PreconditionFailed`.
        """
        validate_id(rid, f"{resource_type}.id")
        body = _object(resource)
        await self._validator.validate(body, expected_type=resource_type)
        if "id" in body and body["id"] != rid:
            raise FhirInvalid(
                [
                    Issue(
                        severity="error",
                        code="invalid",
                        diagnostics=f"resource id {body['id']!r} does not match {rid!r}",
                        expression=(f"{resource_type}.id",),
                    )
                ]
            )
        intent = WriteIntent(resource_type=resource_type, id=rid, resource=body, if_match=if_match)
        stored = (await self._writer.write_many([intent]))[0]
        return stored, stored.version == 1

    async def delete(
        self, resource_type: str, rid: str, *, if_match: int | None = None
    ) -> StoredResource:
        """FHIR delete: a new version that ends the resource, its older versions kept.

        Read and search no longer find it (read is :class:`Gone`), vread of an
        older version and history still show it, and a later update creates it
        again. :class:`NotFound` if it never existed, :class:`Gone` if it is
        already deleted or erased. Erasure (:meth:`erase`) is the separate,
        destructive operation.
        """
        validate_id(rid, f"{resource_type}.id")
        intent = WriteIntent(
            resource_type=resource_type, id=rid, resource={}, if_match=if_match, delete=True
        )
        return (await self._writer.write_many([intent]))[0]

    async def validate(self, resource: Any, *, expected_type: str | None = None) -> None:
        """Check ``resource`` as a write would (``$validate``); nothing is stored.

        Raises :class:`FhirInvalid` with what is wrong and where.
        """
        await self._validator.validate(_object(resource), expected_type=expected_type)

    async def transaction(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        """Apply a FHIR ``transaction`` Bundle all-or-nothing; return the transaction-response."""
        return await apply_transaction(bundle, self._bundle_context())

    async def batch(
        self,
        bundle: Mapping[str, Any],
        outcome: Callable[[MedledgerError], tuple[int, dict[str, Any]]],
    ) -> dict[str, Any]:
        """Apply each entry of a FHIR ``batch`` Bundle on its own; return the batch-response.

        ``outcome`` maps a refused entry's error to its status and OperationOutcome.
        """
        return await apply_batch(bundle, self._bundle_context(), outcome)

    def _bundle_context(self) -> BundleContext:
        return BundleContext(
            validator=self._validator,
            write_many=self._writer.write_many,
            read=self.read,
            conditional=self.conditional,
        )

    async def commit_sealed(self, sealed: Sequence[SealedCommit]) -> None:
        """Index and commit versions an API worker sealed (see ``RecordWriter.commit_sealed``)."""
        await self._writer.commit_sealed(sealed)

    def writing(self, resource_type: str, rid: str) -> bool:
        """Whether a write or erasure of this resource is in progress (see ``RecordWriter``)."""
        return self._writer.writing(resource_type, rid)

    # -- crash recovery and lifecycle ------------------------------------------------------

    def refuse_writes(self, reason: str) -> None:
        """From now on every operation raises :class:`DamagedStore` with ``reason``.

        For a store found damaged after the node opened (e.g. behind an anchor
        learnt from the consortium): nothing more may be written on it.
        """
        self.recovery.refuse(reason)

    async def reindex(self) -> ReindexReport:
        """Rebuild every live resource's search tokens with this code's terms (resumable)."""
        await self.recovery.ensure_recovered()
        return await self.reindexer.run()

    def start_reindex(self) -> bool:
        """Re-index in the background if the index's terms are older (``False``: current)."""
        return self.reindexer.start(self.recovery.ensure_recovered)

    async def ensure_recovered(self) -> None:
        """Run crash recovery now unless it already ran (else the first operation runs it).

        Raises :class:`DamagedStore` as every operation would on a refused store.
        """
        await self.recovery.ensure_recovered()

    async def recover(self) -> int:
        """Take back versions a crashed write left uncommitted (see ``CrashRecovery.recover``)."""
        return await self.recovery.recover()

    async def close(self) -> None:
        """Stop; once every write settled, record it so the next start need not look again."""
        try:
            with contextlib.suppress(MedledgerError):  # left pending: the next start settles
                await self.tokens_settled()
            await self.reindexer.close()
            await self.recovery.close()
        finally:
            await self._sealer.close()
            self._validator.close()

    # -- reading ---------------------------------------------------------------------------

    async def read(self, resource_type: str, rid: str) -> StoredResource:
        await self.recovery.ensure_recovered()
        return await _settled(self.reader.latest, resource_type, rid)

    async def vread(self, resource_type: str, rid: str, version: int) -> StoredResource:
        await self.recovery.ensure_recovered()
        return await _settled(self.reader.version, resource_type, rid, version)

    async def sealed_version(
        self, resource_type: str, rid: str, version: int | None = None
    ) -> SealedVersion:
        """A version as stored, for sharing (see ``RecordReader.sealed_version``)."""
        return await _settled(self.reader.sealed_version, resource_type, rid, version)

    async def history(self, resource_type: str, rid: str) -> list[VersionInfo]:
        """Every version, newest first; erased versions have ``stored=None``.

        Decrypting many versions is CPU work: it runs in a worker thread.
        """
        await self.recovery.ensure_recovered()
        return await asyncio.to_thread(self.reader.history, resource_type, rid)

    async def type_history(self, resource_type: str, limit: int = 100) -> list[VersionInfo]:
        """The ``limit`` latest versions of any resource of the type (in a worker thread)."""
        await self.recovery.ensure_recovered()
        return await asyncio.to_thread(self.reader.type_history, resource_type, limit)

    async def history_page(
        self,
        resource_type: str | None,
        *,
        since_ms: int | None,
        offset: int,
        count: int,
        at: tuple[int, int] | None = None,
    ) -> tuple[list[VersionInfo], bool]:
        """Versions of one type (or of every type), newest first, written at or after
        ``since_ms`` and (``at``, ``[start, end)`` ms) current at some moment of that
        period: those in ``[offset, offset + count)``, and whether more follow.

        Only the page is decrypted (in a worker thread).
        """
        await self.recovery.ensure_recovered()

        def work() -> tuple[list[VersionInfo], bool]:
            end = offset + count
            if since_ms is None and resource_type is not None and at is None:
                rows = self._index.type_history(resource_type, end + 1)
            elif at is not None and resource_type is not None:
                rows = self._index.type_history(resource_type, 2**62)
            else:
                rows = self._index.versions_since(0 if at is not None else since_ms or 0)
                if resource_type is not None:
                    rows = [r for r in rows if r.resource_type == resource_type]
            if at is not None:
                rows = _current_during(rows, at)
                if since_ms is not None:
                    rows = [r for r in rows if r.updated_ms >= since_ms]
            return self.reader.infos(rows[offset:end]), len(rows) > end

        return await asyncio.to_thread(work)

    # -- patients --------------------------------------------------------------------------

    def patient_pseudonym(self, patient_id: str) -> str:
        return self._patients.pseudonym(patient_id)

    def patient_of_pseudonym(self, pseudonym: str) -> str | None:
        """The id of the stored Patient whose keyed pseudonym is ``pseudonym``, if any."""
        return self._patients.patient_of_pseudonym(pseudonym)

    def patient_may_read(
        self,
        resource_type: str,
        rid: str,
        patient_id: str,
        *,
        version: int | None = None,
        whole_history: bool = False,
    ) -> tuple[bool, str | None]:
        """Whether a token bound to ``Patient/<patient_id>`` may read this resource
        (see ``PatientRecords.may_read``: decided with nothing decrypted)."""
        return self._patients.may_read(
            resource_type, rid, patient_id, version=version, whole_history=whole_history
        )

    def resources_of_patient(self, patient_id: str) -> list[tuple[str, str]]:
        """``(type, id)`` of every unerased resource about ``Patient/<patient_id>``."""
        return self._patients.resources_of(patient_id)

    def record_ref(self, resource_type: str, rid: str) -> str:
        return self._keys.record_ref(resource_type, rid)

    # -- search ----------------------------------------------------------------------------

    async def tokens_settled(self) -> None:
        """Return once the search tokens of every version this process acknowledged are
        stored (they follow the acknowledgement: decision 0069); :class:`StorageError` if
        storing some failed again."""
        await self._writer.settle_tokens()

    async def _searchable(self) -> None:
        """Before a search: recovery, then the tokens of every version acknowledged before
        now (decision 0069), in this process or another; :class:`StorageError` if they are
        still missing after :data:`TOKENS_WAIT_S`."""
        await self.recovery.ensure_recovered()
        waiting = set(self._index.pending_tokens())
        if not waiting:
            return
        await self.tokens_settled()
        deadline = time.monotonic() + TOKENS_WAIT_S
        while waiting := waiting & set(self._index.pending_tokens()):
            if time.monotonic() >= deadline:
                raise StorageError(
                    f"the search index is behind: {len(waiting)} acknowledged versions still"
                    " wait for their search tokens"
                )
            await asyncio.sleep(0.002)

    async def search(
        self, resource_type: str, params: Mapping[str, Sequence[str]]
    ) -> list[StoredResource]:
        """Latest versions matching every parameter (see ``services.search``)."""
        _, found = await self.search_page(resource_type, params, 0, None)
        return found

    async def search_page(
        self,
        resource_type: str,
        params: Mapping[str, Sequence[str]],
        offset: int,
        count: int | None,
        sort: Sequence[str] = (),
    ) -> tuple[int, list[StoredResource]]:
        """How many latest versions match, and those in ``[offset, offset + count)`` opened.

        The index look-ups and the decryption run in a worker thread, so an
        expensive query leaves the event loop free (hashing, SQLite and AES-GCM
        spend their time in C; the thread hands the GIL back at least every
        ``sys.getswitchinterval()``). Only the page is decrypted, unless
        ``sort`` (``_sort`` values) asks for every match to be ordered.
        """
        await self._searchable()
        return await asyncio.to_thread(
            self._search.page, resource_type, params, offset, count, sort
        )

    async def included(
        self,
        found: Sequence[StoredResource],
        include: Sequence[tuple[str, bool]],
        revinclude: Sequence[tuple[str, bool]],
    ) -> list[StoredResource]:
        """What ``_include`` and ``_revinclude`` (``(value, iterate)``) add to ``found``."""
        await self._searchable()
        return await asyncio.to_thread(self._search.included, found, include, revinclude)

    async def search_ids(
        self, resource_type: str, params: Mapping[str, Sequence[str]]
    ) -> list[str]:
        """The ids :meth:`search` would return, from the blind index alone (nothing decrypted)."""
        await self._searchable()
        rows = await asyncio.to_thread(self._search.matching, resource_type, params)
        return [row.id for row in rows]

    async def compartment(
        self, patient_ids: Sequence[str], types: Collection[str] | None = None
    ) -> list[VersionRow]:
        """The latest live rows in these patients' compartments, the Patients first
        (see ``RecordSearch.compartment``; index only, in a worker thread)."""
        await self._searchable()
        return await asyncio.to_thread(self._search.compartment, patient_ids, types)

    async def latest_rows(
        self, types: Collection[str] | None = None, since_ms: int | None = None
    ) -> list[VersionRow]:
        """The latest live row of every resource (of ``types``, written at or after
        ``since_ms``), by type and id: what a system-level export holds (index only)."""
        await self.recovery.ensure_recovered()

        def work() -> list[VersionRow]:
            latest: dict[tuple[str, str], VersionRow] = {}
            for row in self._index.versions_since(since_ms or 0):
                if types is not None and row.resource_type not in types:
                    continue
                key = (row.resource_type, row.id)
                if key not in latest or latest[key].version < row.version:
                    latest[key] = row
            return [
                row
                for key, row in sorted(latest.items())
                if not row.erased
                and not row.deleted
                and (current := self._index.latest(*key)) is not None
                and current.version == row.version
            ]

        return await asyncio.to_thread(work)

    async def referenced(
        self,
        shown: Sequence[StoredResource],
        skip: Collection[tuple[str, str]],
        admit: Callable[[VersionRow], bool],
    ) -> list[StoredResource]:
        """What ``shown`` refers to, opened (see ``RecordSearch.referenced``; in a worker thread)."""
        await self._searchable()
        return await asyncio.to_thread(self._search.referenced, shown, skip, admit)

    async def open_rows(self, rows: Sequence[VersionRow]) -> list[StoredResource]:
        """``rows`` (from :meth:`compartment`) decrypted, in a worker thread."""
        await self.recovery.ensure_recovered()
        return await asyncio.to_thread(self._search.open, rows)

    # -- erasure and keys ------------------------------------------------------------------

    async def erase(self, resource_type: str, rid: str) -> int:
        """Crypto-shred every version of a resource and append a ``record.erase`` tombstone."""
        await self.recovery.ensure_recovered()
        return await self._eraser.erase(resource_type, rid)

    async def erase_patient(self, patient_id: str) -> int:
        """Erase the Patient and every resource about them; returns resources erased."""
        await self.recovery.ensure_recovered()
        return await self._eraser.erase_patient(patient_id)

    async def rotate_kek(self) -> dict[str, Any]:
        """New KEK; re-wrap every data key; ``key.rotate`` on the chain; destroy the old KEK."""
        await self.recovery.ensure_recovered()
        return await rotate_kek(
            chain=self._chain,
            index=self._index,
            keys=self._keys,
            writer=self._writer,
            random_bytes=self._random,
        )


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise FhirInvalid(
            [
                Issue(
                    severity="error",
                    code="structure",
                    diagnostics="a FHIR resource must be a JSON object",
                )
            ]
        )
    return dict(value)


async def _settled(read: Callable[..., T], *args: Any) -> T:
    """``read(*args)`` on the event loop, where a read is short; if it meets a write in
    flight (``RecordReader``'s module doc), again on a thread, waiting for its outcome."""
    try:
        return read(*args, wait=False)
    except WriteInFlight:
        return await asyncio.to_thread(read, *args)
