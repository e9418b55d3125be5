"""The records service: FHIR resources stored encrypted, committed on the private chain.

Write (create/update): validate → assign ``id``/``meta`` → seal with a fresh
data key (AES-256-GCM, AAD = institution/type/id/version) → blob store →
index row with the wrapped key and search tokens → ``record.put`` on the
private chain (type, keyed record ref, version, blob hash, patient
pseudonym — never plaintext or PHI). It returns only after the chain commit
is durable; if the commit fails the index row is removed again.

Read: index row → the chain transaction it names (its blob hash, version and
ref must match) → blob (re-hashed) → unwrap the data key → decrypt. Any
mismatch raises :class:`IntegrityError`; erased resources raise :class:`Gone`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from medledger.core.consent import PATIENT_KEY_SYSTEM
from medledger.core.envelope import RecordContext, open_record, seal_record, unwrap_key, wrap_key
from medledger.core.errors import (
    DamagedStore,
    Gone,
    IntegrityError,
    InvalidInput,
    MedledgerError,
    NotFound,
    PreconditionFailed,
    RecordDamaged,
    StorageError,
)
from medledger.core.hashing import sha256
from medledger.core.models import Receipt, Transaction
from medledger.core.transactions import KEY_ROTATE, RECORD_ERASE, RECORD_PUT
from medledger.ledger.clock import Clock, SystemClock
from medledger.ledger.integrity import REPAIR_HINT, check_blocks
from medledger.services.fhir import (
    FhirInvalid,
    Issue,
    dump_resource,
    load_json,
    validate_id,
    validate_resource,
)
from medledger.services.health import StoreHealth
from medledger.services.keys import InstitutionKeys
from medledger.services.search import patient_reference, query_tokens, resource_tokens
from medledger.services.validation import Validator
from medledger.storage.batching import GroupCommitter
from medledger.storage.blobs import BlobStore
from medledger.storage.ports import ChainStore
from medledger.storage.records import RecordIndex, VersionRow

__all__ = [
    "RECORD_ERASE",
    "RECORD_PUT",
    "RecordChain",
    "RecordsService",
    "SealedVersion",
    "StoredResource",
    "VersionInfo",
    "ingest",
]

#: Resources of at least this many bytes are tokenized and sealed off the event loop
#: (below it, the hand-off to a thread costs more than the work).
_OFFLOAD_BYTES = 16 * 1024
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredResource:
    """A resource version as stored: the exact JSON bytes and where it is on the chain."""

    resource_type: str
    id: str
    version: int
    last_updated: str
    #: The decrypted resource (PHI): never in a repr, so never in a log line.
    data: bytes = field(repr=False)
    tx_hash: bytes
    #: The patient pseudonym the version was committed with (for the access trail).
    patient: str | None = None

    def resource(self) -> dict[str, Any]:
        value: dict[str, Any] = load_json(self.data, max_bytes=len(self.data))
        return value


@dataclass(frozen=True, slots=True, kw_only=True)
class SealedVersion:
    """One stored version with its data key, as the sharing protocol needs it."""

    row: VersionRow
    blob: bytes
    #: The record's data key in clear: never in a repr.
    dek: bytes = field(repr=False)
    tx_data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionInfo:
    """One entry of a history: a readable version, or an erased one (``stored`` is ``None``)."""

    resource_type: str
    id: str
    version: int
    last_updated: str
    stored: StoredResource | None


class RecordChain(Protocol):
    """The chain record transactions are committed on.

    The institution's ``PrivateChain``; or, for the benchmark-only
    consortium-only mode, ``ledger.consortium_commit.ConsortiumCommit``, whose
    transactions also need the author signature ``RecordsService(sign_tx=…)``.
    """

    @property
    def chain_id(self) -> str: ...

    @property
    def store(self) -> ChainStore: ...

    @property
    def durable_height(self) -> int:
        """Height of the last block that is durable in ``store``."""
        ...

    async def submit(self, tx_type: str, body: dict[str, Any]) -> Receipt: ...

    async def submit_many(self, txs: Sequence[Transaction]) -> list[Receipt]: ...


def _instant(ms: int) -> str:
    return (
        datetime.fromtimestamp(ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class RecordsService:
    """Create, update, read, history, search and erase FHIR resources of one institution."""

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
    ) -> None:
        """``crash_recovery=False`` (a second service sharing another's index, as the
        consortium-only benchmark mode does) neither records ``chain_base`` nor recovers.
        ``recovery_mark_every``: acknowledged writes between moves of the recovery mark."""
        self._institution = institution
        # Failed writes (disk full) and damaged reads are reported here for /readyz, /metrics.
        self.health = health or StoreHealth(None)
        self._chain = chain
        # Only the consortium-only benchmark mode signs record txs (see RecordChain).
        self._sign_tx = sign_tx
        self._index = index
        self._blobs = blobs
        self._keys = keys
        self._clock: Clock = clock or SystemClock()
        self._random = random_bytes
        self._validator = validator or Validator()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        # Blobs of concurrent writes share one file-system flush.
        self._blob_writes: GroupCommitter[bytes] = GroupCommitter(
            self._put_blobs, name="medledger-blobs"
        )
        self._inflight: Counter[str] = Counter()
        self._recovery = asyncio.Lock()
        self._recovered = False
        self._crash_recovery = crash_recovery
        # Every so many acknowledged writes the recovery mark moves up, so a crash
        # after a long run re-checks only the newest blocks.
        self._mark_every = recovery_mark_every
        self._since_mark = 0
        # Versions indexed but not yet committed or taken back (key -> chain_base), and
        # versions whose take-back failed (e.g. disk full): never settled by the mark.
        self._unsettled: dict[tuple[str, str, int], int] = {}
        self._stuck: dict[tuple[str, str, int], VersionRow] = {}
        self._refusal: str | None = None

    # -- writing ---------------------------------------------------------------------

    async def create(self, resource: Mapping[str, Any]) -> StoredResource:
        """Store a new resource under a server-assigned id; returns version 1."""
        body = _object(resource)
        await self._validator.validate(body)
        rtype = str(body["resourceType"])
        return (await self._write_many([(rtype, str(uuid.uuid4()), body, None, True)]))[0]

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
        resource = _object(resource)
        await self._validator.validate(resource, expected_type=resource_type)
        if "id" in resource and resource["id"] != rid:
            raise FhirInvalid(
                [
                    Issue(
                        severity="error",
                        code="invalid",
                        diagnostics=f"resource id {resource['id']!r} does not match {rid!r}",
                        expression=(f"{resource_type}.id",),
                    )
                ]
            )
        stored = (await self._write_many([(resource_type, rid, dict(resource), if_match, False)]))[
            0
        ]
        return stored, stored.version == 1

    def writing(self, resource_type: str, rid: str) -> bool:
        """Whether a write or erasure of this resource is in progress (its lock is held).

        Read from the store check's thread: a momentary answer, which is all it needs.
        """
        lock = self._locks.get((resource_type, rid))
        return lock is not None and lock.locked()

    # -- crash recovery -------------------------------------------------------------------

    def refuse_writes(self, reason: str) -> None:
        """From now on every operation raises :class:`DamagedStore` with ``reason``.

        For a store found damaged after the node opened (e.g. behind an anchor
        learnt from the consortium): nothing more may be written on it.
        """
        self._refusal = reason

    async def _ready(self) -> None:
        """Before the first operation: :meth:`recover` (once)."""
        if self._refusal is not None:
            raise DamagedStore(self._refusal)
        if not self._recovered:
            async with self._recovery:
                if not self._recovered:
                    await self.recover()
                    self._recovered = True

    async def ensure_recovered(self) -> None:
        """Run crash recovery now unless it already ran (else the first operation runs it).

        Raises :class:`DamagedStore` as every operation would on a refused store.
        """
        await self._ready()

    async def recover(self) -> int:
        """Take back versions a crashed write indexed but never committed; returns how many.

        A write indexes its version before the chain commit, stamped with the
        chain's durable height (``chain_base``), and takes it back if the commit
        fails; a crash in between, or a take-back that failed, leaves a row
        whose transaction may not be on the chain. Every such row has a
        ``chain_base`` at or above the index's recovery mark, so only those are
        looked at (no wall-clock window). A row is taken back only when that it
        was never committed is proven: every block above its ``chain_base``
        re-derives intact from the stored bytes and none holds its transaction.
        A chain below a height the index saw durable, or damaged above the
        oldest such row, raises :class:`DamagedStore` and nothing is deleted.
        """
        if not self._crash_recovery:
            return 0
        head = self._chain.durable_height
        candidates = [
            row
            for row in self._index.unsettled(self._index.recovery_mark())
            if _key(row) not in self._unsettled
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
            await self._undo(orphans, [row.blob_hash for row in orphans])
        await self._advance_mark(head)
        return len(orphans)

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

    async def _write_many(
        self, items: Sequence[tuple[str, str, dict[str, Any], int | None, bool]]
    ) -> list[StoredResource]:
        """Write several versions all-or-nothing: one index batch, one chain block."""
        await self._ready()
        keys = sorted({(t, i) for t, i, *_ in items})
        if len(keys) != len(items):
            raise FhirInvalid(
                [
                    Issue(
                        severity="error",
                        code="business-rule",
                        diagnostics="the same resource is written twice in one request",
                    )
                ]
            )
        locks = [self._locks.setdefault(k, asyncio.Lock()) for k in keys]
        for lock in locks:
            await lock.acquire()
        if self._stuck:
            await self._settle_stuck()
        if self._crash_recovery and self._since_mark >= self._mark_every:
            self._since_mark = 0
            try:
                await self._advance_mark(self._chain.durable_height)
            except MedledgerError as exc:
                log.warning("could not record the recovery mark: %s", exc)
        kek_id, kek = self._keys.current_kek()
        self._inflight[kek_id] += 1
        written: list[VersionRow] = []
        prepared: list[tuple[VersionRow, set[bytes], StoredResource, Transaction]] = []
        try:
            for rtype, rid, resource, if_match, new in items:
                latest = self._index.latest(rtype, rid)
                if new and latest is not None:
                    raise PreconditionFailed(f"{rtype}/{rid} already exists")
                current = latest.version if latest is not None else 0
                if if_match is not None and if_match != current:
                    raise PreconditionFailed(
                        f"{rtype}/{rid} is at version {current}, not {if_match}"
                    )
                self._keep_reserved(rtype, resource, latest)
                prepared.append(await self._seal(rtype, rid, current + 1, resource, kek_id, kek))
            for row, tokens, _stored, _tx in prepared:
                if row.chain_base is not None:
                    self._unsettled[_key(row)] = row.chain_base
                await self._index.put_version(row, tokens)
                written.append(row)
            await self._chain.submit_many([tx for *_, tx in prepared])
            self._since_mark += 1
            self.health.write_succeeded()
            return [stored for _, _, stored, _ in prepared]
        except BaseException as exc:
            if isinstance(exc, StorageError):
                self.health.write_failed(exc)
            try:
                await self._undo(written, [row.blob_hash for row, *_ in prepared])
            except BaseException:
                # Left for the next write (or the next start) to take back.
                self._stuck.update((_key(row), row) for row in written)
                raise
            raise
        finally:
            for row, *_ in prepared:
                self._unsettled.pop(_key(row), None)
            self._inflight[kek_id] -= 1
            for lock in locks:
                lock.release()

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
            old = _reserved_entries(self._open(latest).resource())
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

    async def _undo(self, written: list[VersionRow], blob_hashes: list[bytes]) -> None:
        """Take back versions whose chain commit failed: rows, search tokens, blobs."""
        for row in reversed(written):
            await self._index.remove_version(row.resource_type, row.id, row.version)
            previous = self._index.latest(row.resource_type, row.id)
            tokens: set[bytes] = set()
            if previous is not None and not previous.erased:
                # The search index must describe the version that is current again.
                # Stored versions are indexed as they are, whatever the current bound.
                tokens = resource_tokens(
                    self._keys.search_key, self._open(previous).resource(), limit=None
                )
            await self._index.set_tokens(row.resource_type, row.id, tokens)
        for blob_hash in blob_hashes:
            await asyncio.to_thread(self._blobs.delete, blob_hash)

    async def _settle_stuck(self) -> None:
        """Take back versions whose take-back failed before (their commit had failed)."""
        rows = sorted(self._stuck.values(), key=lambda r: (r.resource_type, r.id, r.version))
        # A commit reported as failed may still have reached the disk: keep those.
        orphans = [row for row in rows if not self._committed(row.tx_hash)]
        try:
            await self._undo(orphans, [row.blob_hash for row in orphans])
        except MedledgerError as exc:
            log.warning(
                "%d uncommitted record versions still wait to be taken back: %s", len(orphans), exc
            )
            return
        self._stuck.clear()

    def _put_blobs(self, blobs: Sequence[bytes]) -> list[BaseException | None]:
        self._blobs.put_many(blobs)
        return [None] * len(blobs)

    async def close(self) -> None:
        """Stop; once every write settled, record it so the next start need not look again."""
        try:
            if self._crash_recovery and self._recovered and self._refusal is None:
                await self._advance_mark(self._chain.durable_height)
        except MedledgerError as exc:
            log.warning("could not record the recovery mark: %s", exc)
        finally:
            await self._blob_writes.close()
            self._validator.close()

    async def _seal(
        self, rtype: str, rid: str, version: int, resource: dict[str, Any], kek_id: str, kek: bytes
    ) -> tuple[VersionRow, set[bytes], StoredResource, Transaction]:
        now = self._clock.now_ms()
        meta = dict(resource.get("meta") or {})
        meta.update(versionId=str(version), lastUpdated=_instant(now))
        body = {k: v for k, v in resource.items() if k not in ("resourceType", "id", "meta")}
        final = {"resourceType": rtype, "id": rid, "meta": meta, **body}
        data = dump_resource(final)
        context = RecordContext(
            institution=self._institution, resource_type=rtype, id=rid, version=version
        )
        dek, nonce = self._random(32), self._random(12)
        # Tokens first: a resource refused for too many search terms writes no blob.
        # A large resource is tokenized and encrypted on a worker thread, so it does
        # not hold up every other request on the event loop meanwhile.
        if len(data) >= _OFFLOAD_BYTES:
            tokens, blob = await asyncio.to_thread(
                self._tokens_and_blob, final, dek, nonce, data, context
            )
        else:
            tokens, blob = self._tokens_and_blob(final, dek, nonce, data, context)
        await self._blob_writes.submit(blob)
        blob_hash = sha256(blob)
        pseudonym = self._keys.pseudonym(patient_reference(final))
        tx = Transaction(
            type=RECORD_PUT,
            chain=self._chain.chain_id,
            body={
                "resource_type": rtype,
                "ref": self._keys.record_ref(rtype, rid),
                "version": version,
                "blob": blob_hash.hex(),
                "patient": pseudonym,
            },
            time_ms=now,
        )
        if self._sign_tx is not None:
            tx = self._sign_tx(tx)  # before hashing: the index keeps the committed tx's hash
        row = VersionRow(
            resource_type=rtype,
            id=rid,
            version=version,
            blob_hash=blob_hash,
            wrapped_dek=wrap_key(kek, self._random(12), dek, blob_hash),
            kek_id=kek_id,
            patient=pseudonym,
            updated_ms=now,
            tx_hash=tx.hash(),
            chain_base=self._chain.durable_height if self._crash_recovery else None,
        )
        stored = StoredResource(
            resource_type=rtype,
            id=rid,
            version=version,
            last_updated=_instant(now),
            data=data,
            tx_hash=row.tx_hash,
            patient=pseudonym,
        )
        return row, tokens, stored, tx

    def _tokens_and_blob(
        self,
        resource: dict[str, Any],
        dek: bytes,
        nonce: bytes,
        data: bytes,
        context: RecordContext,
    ) -> tuple[set[bytes], bytes]:
        """The resource's search tokens and its sealed blob (pure CPU work; any thread)."""
        tokens = resource_tokens(self._keys.search_key, resource)
        return tokens, seal_record(dek, nonce, data, context)

    async def transaction(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        """Apply a FHIR ``transaction`` Bundle all-or-nothing; return the transaction-response."""
        validate_resource(dict(bundle), expected_type="Bundle")
        if bundle.get("type") != "transaction":
            raise InvalidInput("only Bundles of type 'transaction' can be submitted")
        entries = bundle.get("entry") or []
        plan: list[tuple[str, str, dict[str, Any], int | None, bool]] = []
        urls: dict[str, str] = {}
        for n, entry in enumerate(entries):
            request, resource = entry.get("request") or {}, entry.get("resource")
            method, url = request.get("method"), str(request.get("url", ""))
            if not isinstance(resource, dict) or method not in ("POST", "PUT"):
                raise FhirInvalid(
                    [
                        Issue(
                            severity="error",
                            code="not-supported",
                            diagnostics="transaction entries must POST or PUT a resource",
                            expression=(f"Bundle.entry[{n}]",),
                        )
                    ]
                )
            rtype = str(resource.get("resourceType"))
            if method == "POST":
                rid, new = str(uuid.uuid4()), True
            else:
                parts = url.split("/")
                if len(parts) != 2 or parts[0] != rtype:
                    raise FhirInvalid(
                        [
                            Issue(
                                severity="error",
                                code="invalid",
                                diagnostics=f"PUT url must be {rtype}/<id>",
                                expression=(f"Bundle.entry[{n}].request.url",),
                            )
                        ]
                    )
                rid, new = validate_id(parts[1], f"Bundle.entry[{n}].request.url"), False
            if isinstance(entry.get("fullUrl"), str):
                urls[entry["fullUrl"]] = f"{rtype}/{rid}"
            plan.append((rtype, rid, resource, None, new))
        resolved = [(t, i, _resolve_refs(r, urls), m, n) for t, i, r, m, n in plan]
        for n, (_t, _i, resource, _m, _new) in enumerate(resolved):
            try:
                await self._validator.validate(resource)
            except FhirInvalid as exc:
                raise FhirInvalid(
                    [
                        Issue(
                            severity=i.severity,
                            code=i.code,
                            diagnostics=i.diagnostics,
                            expression=tuple(
                                f"Bundle.entry[{n}].resource.{e}" for e in i.expression
                            ),
                        )
                        for i in exc.issues
                    ]
                ) from None
        stored = await self._write_many(resolved)
        return {
            "resourceType": "Bundle",
            "type": "transaction-response",
            "entry": [
                {
                    "response": {
                        "status": "201 Created" if s.version == 1 else "200 OK",
                        "location": f"{s.resource_type}/{s.id}/_history/{s.version}",
                        "etag": f'W/"{s.version}"',
                        "lastModified": s.last_updated,
                    }
                }
                for s in stored
            ],
        }

    # -- reading -------------------------------------------------------------------------

    async def read(self, resource_type: str, rid: str) -> StoredResource:
        await self._ready()
        row = self._index.latest(resource_type, rid)
        if row is None:
            raise NotFound(f"{resource_type}/{rid} does not exist")
        return self._open(row)

    async def vread(self, resource_type: str, rid: str, version: int) -> StoredResource:
        await self._ready()
        row = self._index.get_version(resource_type, rid, version)
        if row is None:
            raise NotFound(f"{resource_type}/{rid} has no version {version}")
        return self._open(row)

    def sealed_version(
        self, resource_type: str, rid: str, version: int | None = None
    ) -> SealedVersion:
        """A version as stored — ciphertext, unwrapped data key, chain tx — for sharing.

        The same checks as a read (index against chain tx, blob hash) apply;
        the plaintext is never produced here.
        """
        row = (
            self._index.latest(resource_type, rid)
            if version is None
            else self._index.get_version(resource_type, rid, version)
        )
        if row is None:
            raise NotFound(f"{resource_type}/{rid} does not exist (or has no such version)")
        tx_data, blob, dek = self._sealed(row)
        return SealedVersion(row=row, blob=blob, dek=dek, tx_data=tx_data)

    def patient_pseudonym(self, patient_id: str) -> str:
        pseudonym = self._keys.pseudonym(f"Patient/{patient_id}")
        assert pseudonym is not None
        return pseudonym

    def patient_of_pseudonym(self, pseudonym: str) -> str | None:
        """The id of the stored Patient whose keyed pseudonym is ``pseudonym``, if any."""
        for rtype, rid in self._index.records_of_patient(pseudonym):
            if rtype == "Patient" and self.patient_pseudonym(rid) == pseudonym:
                return rid
        return None

    def patient_may_read(
        self,
        resource_type: str,
        rid: str,
        patient_id: str,
        *,
        version: int | None = None,
        whole_history: bool = False,
    ) -> tuple[bool, str | None]:
        """Whether a token bound to ``Patient/<patient_id>`` may read this resource,
        and if not, the pseudonym of the patient the refused resource is about (if any).

        The latest version, ``version``, or with ``whole_history`` every version
        (all unerased ones must be the patient's, and one must be left). Decided
        from the index's patient pseudonyms alone, with nothing decrypted: the
        same work whether the resource is someone else's, erased or was never
        written, so neither the answer nor its timing tells a patient which.
        """
        expected = self.patient_pseudonym(patient_id).encode()
        if whole_history:
            rows = self._index.history(resource_type, rid)
        else:
            row = (
                self._index.latest(resource_type, rid)
                if version is None
                else self._index.get_version(resource_type, rid, version)
            )
            rows = [] if row is None else [row]
        readable = [r for r in rows if not r.erased]
        theirs = [hmac.compare_digest((r.patient or "").encode(), expected) for r in readable]
        if theirs and all(theirs):
            return True, None
        return False, next((r.patient for r in rows if r.patient), None)

    def resources_of_patient(self, patient_id: str) -> list[tuple[str, str]]:
        """``(type, id)`` of every unerased resource about ``Patient/<patient_id>``."""
        candidates = [("Patient", patient_id)]
        candidates += self._index.records_of_patient(self.patient_pseudonym(patient_id))
        return [
            key
            for key in dict.fromkeys(candidates)  # each once, in order
            if (row := self._index.latest(*key)) is not None and not row.erased
        ]

    def record_ref(self, resource_type: str, rid: str) -> str:
        return self._keys.record_ref(resource_type, rid)

    def _damaged(self, row: VersionRow, what: str) -> RecordDamaged:
        """The error for a damaged acknowledged version, counted and logged (no PHI)."""
        ref = self._keys.record_ref(row.resource_type, row.id)
        exc = RecordDamaged(
            f"the record store is damaged: {row.resource_type} record {ref[:16]}… "
            f"version {row.version}: {what}"
        )
        self.health.integrity_error(exc)
        return exc

    def _sealed(self, row: VersionRow) -> tuple[bytes, bytes, bytes]:
        """``(tx bytes, ciphertext, data key)`` of an acknowledged version, all checked.

        What the index and the chain say was acknowledged but cannot be read
        back intact is :class:`RecordDamaged` — never :class:`NotFound`.
        """
        tx_data = self._checked_tx(row)
        assert row.wrapped_dek is not None and row.kek_id is not None
        try:
            blob = self._blobs.get(row.blob_hash)
        except NotFound:
            raise self._damaged(row, "its blob is missing") from None
        except IntegrityError:
            raise self._damaged(row, "its blob does not match its hash") from None
        try:
            dek = unwrap_key(self._keys.kek(row.kek_id), row.wrapped_dek, row.blob_hash)
        except IntegrityError:
            raise self._damaged(row, "its data key does not unwrap") from None
        return tx_data, blob, dek

    def _checked_tx(self, row: VersionRow) -> bytes:
        if row.erased or row.wrapped_dek is None or row.kek_id is None:
            raise Gone(f"{row.resource_type}/{row.id} was erased")
        try:
            _, tx_data = self._chain.store.tx_by_hash(row.tx_hash)
        except NotFound:
            raise self._damaged(row, "its chain transaction is missing") from None
        # The bytes hash to the committed tx hash, so a plain parse is enough here;
        # `verify` checks canonical form for the whole chain.
        tx = _parse(tx_data)
        body = tx.get("body") if isinstance(tx, dict) else None
        if (
            not isinstance(body, dict)
            or tx.get("type") != RECORD_PUT
            or body.get("resource_type") != row.resource_type
            or body.get("version") != row.version
            or body.get("blob") != row.blob_hash.hex()
            or body.get("ref") != self._keys.record_ref(row.resource_type, row.id)
            or body.get("patient") != row.patient
        ):
            raise self._damaged(row, "the index does not match its chain transaction")
        return tx_data

    def _open(self, row: VersionRow) -> StoredResource:
        _, blob, dek = self._sealed(row)
        context = RecordContext(
            institution=self._institution,
            resource_type=row.resource_type,
            id=row.id,
            version=row.version,
        )
        try:
            data = open_record(dek, blob, context)
        except IntegrityError:
            raise self._damaged(row, "its ciphertext does not authenticate") from None
        return StoredResource(
            resource_type=row.resource_type,
            id=row.id,
            version=row.version,
            last_updated=_instant(row.updated_ms),
            data=data,
            tx_hash=row.tx_hash,
            patient=row.patient,
        )

    async def history(self, resource_type: str, rid: str) -> list[VersionInfo]:
        """Every version, newest first; erased versions have ``stored=None``.

        Decrypting many versions is CPU work: it runs in a worker thread.
        """
        await self._ready()

        def work() -> list[VersionInfo]:
            rows = self._index.history(resource_type, rid)
            if not rows:
                raise NotFound(f"{resource_type}/{rid} does not exist")
            return [self._info(r) for r in rows]

        return await asyncio.to_thread(work)

    async def type_history(self, resource_type: str, limit: int = 100) -> list[VersionInfo]:
        """The ``limit`` latest versions of any resource of the type (in a worker thread)."""
        await self._ready()

        def work() -> list[VersionInfo]:
            return [self._info(r) for r in self._index.type_history(resource_type, limit)]

        return await asyncio.to_thread(work)

    def _info(self, row: VersionRow) -> VersionInfo:
        stored = None if row.erased else self._open(row)
        return VersionInfo(
            resource_type=row.resource_type,
            id=row.id,
            version=row.version,
            last_updated=_instant(row.updated_ms),
            stored=stored,
        )

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
    ) -> tuple[int, list[StoredResource]]:
        """How many latest versions match, and those in ``[offset, offset + count)`` opened.

        The index look-ups and the decryption run in a worker thread, so an
        expensive query leaves the event loop free (hashing, SQLite and AES-GCM
        spend their time in C; the thread hands the GIL back at least every
        ``sys.getswitchinterval()``). Only the page is decrypted.
        """
        await self._ready()

        def work() -> tuple[int, list[StoredResource]]:
            rows = self._matching(resource_type, params)
            end = None if count is None else offset + count
            return len(rows), [self._open(row) for row in rows[offset:end]]

        return await asyncio.to_thread(work)

    async def search_ids(
        self, resource_type: str, params: Mapping[str, Sequence[str]]
    ) -> list[str]:
        """The ids :meth:`search` would return, from the blind index alone (nothing decrypted)."""
        await self._ready()
        rows = await asyncio.to_thread(self._matching, resource_type, params)
        return [row.id for row in rows]

    def _matching(
        self, resource_type: str, params: Mapping[str, Sequence[str]]
    ) -> list[VersionRow]:
        """The latest, unerased rows matching ``params`` (blocking: index reads)."""
        groups = query_tokens(self._keys.search_key, resource_type, params)
        ids = self._index.search(resource_type, groups) if groups else []
        if not groups:
            ids = [r.id for r in self._index.type_history(resource_type, 10**9) if not r.erased]
            ids = sorted(set(ids))
        rows = []
        for rid in ids:
            row = self._index.latest(resource_type, rid)
            if row is not None and not row.erased:
                rows.append(row)
        return rows

    # -- erasure and keys -----------------------------------------------------------------

    async def erase(self, resource_type: str, rid: str) -> int:
        """Crypto-shred every version of a resource and append a ``record.erase`` tombstone."""
        await self._ready()
        validate_id(rid)
        lock = self._locks.setdefault((resource_type, rid), asyncio.Lock())
        async with lock:
            latest = self._index.latest(resource_type, rid)
            if latest is None:
                raise NotFound(f"{resource_type}/{rid} does not exist")
            if latest.erased:
                raise Gone(f"{resource_type}/{rid} was already erased")
            blob_hashes = await self._index.erase(resource_type, rid)
            for h in blob_hashes:
                await asyncio.to_thread(self._blobs.delete, h)
            await self._chain.submit(
                RECORD_ERASE,
                {
                    "resource_type": resource_type,
                    "ref": self._keys.record_ref(resource_type, rid),
                    "versions": len(blob_hashes),
                    "patient": latest.patient,
                },
            )
            return len(blob_hashes)

    async def erase_patient(self, patient_id: str) -> int:
        """Erase the Patient and every resource about them; returns resources erased."""
        validate_id(patient_id)
        pseudonym = self._keys.pseudonym(f"Patient/{patient_id}")
        assert pseudonym is not None
        erased = 0
        for rtype, rid in self._index.records_of_patient(pseudonym):
            latest = self._index.latest(rtype, rid)
            if latest is not None and not latest.erased:
                await self.erase(rtype, rid)
                erased += 1
        if erased == 0:
            raise NotFound(f"no records of Patient/{patient_id}")
        return erased

    async def rotate_kek(self) -> dict[str, Any]:
        """New KEK; re-wrap every data key; ``key.rotate`` on the chain; destroy the old KEK."""
        await self._ready()
        old_id, old = self._keys.current_kek()
        new_id = self._keys.add_current_kek()
        new = self._keys.kek(new_id)
        # Writes that picked the old KEK before the switch must land before the sweep.
        while self._inflight[old_id]:
            await asyncio.sleep(0.001)

        def rewrap(row: VersionRow) -> bytes:
            assert row.wrapped_dek is not None
            dek = unwrap_key(old, row.wrapped_dek, row.blob_hash)
            return wrap_key(new, self._random(12), dek, row.blob_hash)

        count = await self._index.rewrap(old_id, new_id, rewrap)
        if self._index.count_wrapped_by(old_id):
            raise IntegrityError("data keys still wrapped by the old KEK; it was kept")
        await self._chain.submit(
            KEY_ROTATE, {"purpose": "kek", "old": old_id, "new": new_id, "rewrapped": count}
        )
        self._keys.destroy_kek(old_id)
        return {"old": old_id, "new": new_id, "rewrapped": count}


async def ingest(
    records: RecordsService, resources: Sequence[Mapping[str, Any]], writers: int
) -> None:
    """Store ``resources`` under their own ids (update-as-create) with ``writers`` concurrent writers.

    References between them stay valid because ids are kept; used by the demo
    and the benchmarks to load synthetic patients.
    """
    todo = iter(resources)

    async def writer() -> None:
        for res in todo:
            await records.update(str(res["resourceType"]), str(res["id"]), res)

    await asyncio.gather(*(writer() for _ in range(writers)))


def _key(row: VersionRow) -> tuple[str, str, int]:
    return (row.resource_type, row.id, row.version)


def _parse(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        # Integers beyond 64 bits: orjson refuses them, canonical JSON does not.
        return json.loads(data)


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


def _resolve_refs(value: Any, urls: Mapping[str, str]) -> Any:
    """Replace transaction-local references (``urn:uuid:…``) with the assigned ``Type/id``."""
    if isinstance(value, dict):
        return {
            k: (
                urls.get(v, v)
                if k == "reference" and isinstance(v, str)
                else _resolve_refs(v, urls)
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_resolve_refs(v, urls) for v in value]
    return value
