"""Reading stored versions: every read checked against the chain, the blob hash and the key.

What the index and the chain say was acknowledged but cannot be read back
intact is :class:`RecordDamaged` (counted for ``/readyz`` and ``/metrics``),
never :class:`NotFound`.

A write indexes its row before the block holding its transaction commits
(decision 0058), so a read can meet a row whose transaction is not on the
chain yet: a write in flight, not damage. Such a read waits, bounded by
:data:`IN_FLIGHT_S`, until the transaction is committed (it then shows the
new version: durable, its acknowledgement on its way) or the row is taken
back (a failed write: it shows what was there before). Only a row whose
transaction stays missing past that bound is damage. Waiting blocks, so a
caller on the event loop passes ``wait=False`` and gets :class:`WriteInFlight`
instead, to wait on a thread.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import orjson

from medledger.core.envelope import RecordContext, open_record, unwrap_key
from medledger.core.errors import Gone, IntegrityError, MedledgerError, NotFound, RecordDamaged
from medledger.core.transactions import RECORD_PUT
from medledger.services.health import StoreHealth
from medledger.services.keys import InstitutionKeys
from medledger.services.records.model import (
    RecordChain,
    SealedVersion,
    StoredResource,
    VersionInfo,
    instant,
)
from medledger.storage.ports import BlobStore, RecordIndex, VersionRow

__all__ = ["IN_FLIGHT_S", "RecordReader", "WriteInFlight"]

#: Checked chain transactions remembered (then forgotten all at once, as record refs are).
_COMMITTED = 4096
#: How long a read waits for a version whose row is indexed and whose transaction is
#: not on the chain: far longer than a write takes from its index commit to its block,
#: even on a loaded machine; a transaction missing for longer is damage.
IN_FLIGHT_S = 5.0
#: How many times ``latest`` looks again after the row it met was taken back.
_RESOLVE_TRIES = 3


class WriteInFlight(MedledgerError):
    """The version read is indexed and its write not yet committed (only with ``wait=False``).

    The caller repeats the read with ``wait=True`` off the event loop.
    """


class _TakenBack(NotFound):
    """The row a read waited on was removed or replaced: its write failed."""


class RecordReader:
    """Open index rows into resources (blocking: index, chain store and blob reads)."""

    def __init__(
        self,
        *,
        institution: str,
        chain: RecordChain,
        index: RecordIndex,
        blobs: BlobStore,
        keys: InstitutionKeys,
        health: StoreHealth,
    ) -> None:
        self._institution = institution
        self._chain = chain
        self._index = index
        self._blobs = blobs
        self._keys = keys
        self._health = health
        # tx hash -> (type, id, version, blob hash, patient) a committed record.put says.
        self._committed: dict[bytes, tuple[str, str, int, bytes, str | None]] = {}

    def latest(self, resource_type: str, rid: str, *, wait: bool = True) -> StoredResource:
        """The newest committed version (see the module doc for ``wait``)."""
        for _ in range(_RESOLVE_TRIES):
            row = self._index.latest(resource_type, rid)
            if row is None:
                raise NotFound(f"{resource_type}/{rid} does not exist")
            _not_deleted(row)
            try:
                return self.open(row, wait=wait)
            except _TakenBack:
                continue  # the newest version's write failed: the one before is newest again
        raise NotFound(f"{resource_type}/{rid} is being rewritten; retry")

    def version(
        self, resource_type: str, rid: str, version: int, *, wait: bool = True
    ) -> StoredResource:
        row = self._index.get_version(resource_type, rid, version)
        if row is None:
            raise NotFound(f"{resource_type}/{rid} has no version {version}")
        _not_deleted(row)
        return self.open(row, wait=wait)  # its write failed meanwhile: NotFound

    def history(self, resource_type: str, rid: str) -> list[VersionInfo]:
        """Every version, newest first; erased versions and deletions have ``stored=None``."""
        rows = self._index.history(resource_type, rid)
        infos = self.infos(rows)
        if not infos:
            raise NotFound(f"{resource_type}/{rid} does not exist")
        return infos

    def type_history(self, resource_type: str, limit: int) -> list[VersionInfo]:
        """The ``limit`` latest versions of any resource of the type."""
        return self.infos(self._index.type_history(resource_type, limit))

    def sealed_version(
        self, resource_type: str, rid: str, version: int | None = None, *, wait: bool = True
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
        _not_deleted(row)
        tx_data, blob, dek = self.sealed(row, wait=wait)
        return SealedVersion(row=row, blob=blob, dek=dek, tx_data=tx_data)

    def infos(self, rows: Iterable[VersionRow]) -> list[VersionInfo]:
        """:meth:`info` of each row, in order, leaving out versions whose write failed.

        A list read beside a write that fails would otherwise fail whole (a
        :class:`NotFound` for a version that never came to be).
        """
        out = []
        for row in rows:
            try:
                out.append(self.info(row))
            except _TakenBack:
                continue
        return out

    def info(self, row: VersionRow) -> VersionInfo:
        stored = None if row.erased or row.deleted else self.open(row)
        return VersionInfo(
            resource_type=row.resource_type,
            id=row.id,
            version=row.version,
            last_updated=instant(row.updated_ms),
            stored=stored,
            deleted=row.deleted,
            updated_ms=row.updated_ms,
        )

    def open(self, row: VersionRow, *, wait: bool = True) -> StoredResource:
        """The decrypted version ``row`` names, after every check of :meth:`sealed`.

        The chain transaction's side of the first check may come from memory
        (:meth:`_check_chained`); the row, the blob and its hash, the key and the
        ciphertext's authentication are read and checked on every call. Waits
        for a write in flight (module doc); :class:`NotFound` if its write failed.
        """
        self._check_chained(row, wait=wait)
        blob, dek = self._blob_and_key(row)
        context = RecordContext(
            institution=self._institution,
            resource_type=row.resource_type,
            id=row.id,
            version=row.version,
        )
        try:
            data = open_record(dek, blob, context)
        except IntegrityError:
            raise self.damaged(row, "its ciphertext does not authenticate") from None
        return StoredResource(
            resource_type=row.resource_type,
            id=row.id,
            version=row.version,
            last_updated=instant(row.updated_ms),
            data=data,
            tx_hash=row.tx_hash,
            patient=row.patient,
        )

    def open_unless_failed(self, row: VersionRow) -> StoredResource | None:
        """:meth:`open`, or ``None`` when ``row``'s write failed while the read waited on it.

        For the rows of a list (a search page, includes): a write that fails
        beside it leaves its resource out of that one answer, instead of failing
        the whole answer. Its previous version is not shown in its place: the
        row may have matched on terms only the failed version had.
        """
        try:
            return self.open(row)
        except _TakenBack:
            return None

    def open_all(self, rows: Iterable[VersionRow]) -> list[StoredResource]:
        """The rows opened, in order, leaving out those whose write failed meanwhile."""
        return [s for row in rows if (s := self.open_unless_failed(row)) is not None]

    def sealed(self, row: VersionRow, *, wait: bool = True) -> tuple[bytes, bytes, bytes]:
        """``(tx bytes, ciphertext, data key)`` of an acknowledged version, all checked.

        An erased version raises :class:`Gone`; a damaged one :class:`RecordDamaged`.
        """
        tx_data = self._checked_tx(row, wait=wait)
        blob, dek = self._blob_and_key(row)
        return tx_data, blob, dek

    def _blob_and_key(self, row: VersionRow) -> tuple[bytes, bytes]:
        """The ciphertext (re-hashed against ``row``'s blob hash) and its unwrapped data key."""
        assert row.wrapped_dek is not None and row.kek_id is not None
        try:
            blob = self._blobs.get(row.blob_hash)
        except NotFound:
            raise self.damaged(row, "its blob is missing") from None
        except IntegrityError:
            raise self.damaged(row, "its blob does not match its hash") from None
        try:
            dek = unwrap_key(self._keys.kek_cipher(row.kek_id), row.wrapped_dek, row.blob_hash)
        except IntegrityError:
            raise self.damaged(row, "its data key does not unwrap") from None
        return blob, dek

    def damaged(self, row: VersionRow, what: str) -> RecordDamaged:
        """The error for a damaged acknowledged version, counted and logged (no PHI)."""
        ref = self._keys.record_ref(row.resource_type, row.id)
        exc = RecordDamaged(
            f"the record store is damaged: {row.resource_type} record {ref[:16]}… "
            f"version {row.version}: {what}"
        )
        self._health.integrity_error(exc)
        return exc

    def _check_chained(self, row: VersionRow, *, wait: bool) -> None:
        """What :meth:`_checked_tx` checks, the transaction's side remembered.

        A committed transaction never changes: its bytes hash to the ``tx_hash``
        the row names, and a chain only grows. So once a row was found to say
        exactly what the transaction ``tx_hash`` says, those values are kept,
        keyed by the hash (what the index row holds itself: a type, an id, a
        version, a blob hash, a pseudonym; no key, no plaintext, never the
        resource), and a later row naming the same
        transaction is compared with them instead of reading and parsing the
        transaction again. The row itself is read fresh on every call, so an
        index row changed on disk still fails the comparison; an erased version
        is :class:`Gone` before anything is looked up.
        """
        if row.erased or row.wrapped_dek is None or row.kek_id is None:
            raise Gone(f"{row.resource_type}/{row.id} was erased")
        says = (row.resource_type, row.id, row.version, row.blob_hash, row.patient)
        committed = self._committed.get(row.tx_hash)
        if committed is None:
            self._checked_tx(row, wait=wait)
            if len(self._committed) >= _COMMITTED:
                self._committed.clear()
            self._committed[row.tx_hash] = says
        elif committed != says:
            raise self.damaged(row, "the index does not match its chain transaction")

    def _checked_tx(self, row: VersionRow, *, wait: bool) -> bytes:
        """The committed ``record.put`` bytes of ``row``, which must say what the row says."""
        if row.erased or row.wrapped_dek is None or row.kek_id is None:
            raise Gone(f"{row.resource_type}/{row.id} was erased")
        tx_data = self._committed_tx(row, wait=wait)
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
            raise self.damaged(row, "the index does not match its chain transaction")
        return tx_data

    def _committed_tx(self, row: VersionRow, *, wait: bool) -> bytes:
        """``row``'s transaction bytes once committed: waits out a write in flight.

        :class:`WriteInFlight` without ``wait``; :class:`_TakenBack` when the row
        is removed or replaced meanwhile; damage when the transaction is still
        missing after :data:`IN_FLIGHT_S` with the row unchanged.
        """
        deadline: float | None = None
        pause = 0.001
        while True:
            try:
                return self._chain.store.tx_by_hash(row.tx_hash)[1]
            except NotFound:
                pass
            if not wait:
                raise WriteInFlight(f"{row.resource_type} version {row.version} is being written")
            current = self._index.get_version(row.resource_type, row.id, row.version)
            if current is None or current.tx_hash != row.tx_hash:
                raise _TakenBack(
                    f"{row.resource_type}/{row.id} has no version {row.version} (its write failed)"
                )
            now = time.monotonic()
            if deadline is None:
                deadline = now + IN_FLIGHT_S
            elif now >= deadline:
                raise self.damaged(row, "its chain transaction is missing")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


def _not_deleted(row: VersionRow) -> None:
    """A deletion has nothing to show: reading it (or, as latest, the resource) is 410."""
    if row.deleted:
        raise Gone(f"{row.resource_type}/{row.id} was deleted (version {row.version})")


def _parse(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        # Integers beyond 64 bits: orjson refuses them, canonical JSON does not.
        return json.loads(data)
