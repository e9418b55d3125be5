"""Sealing a version: its final JSON, ciphertext, blob, index row and ``record.put``.

The chain transaction carries only the type, the keyed record ref, the
version, the blob hash and the patient pseudonym — never plaintext or PHI.

:meth:`Sealer.prepare` does the CPU work and stores nothing; :meth:`Sealer.store`
makes the blob durable. They are apart so that a write can index its row while
its blob is flushed (``writes``): the row and the transaction need only the
blob's hash, which is known before the blob is on disk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from medledger.core.envelope import RecordContext, seal_record, wrap_key
from medledger.core.hashing import sha256
from medledger.core.models import Transaction
from medledger.core.transactions import RECORD_PUT
from medledger.ledger.clock import Clock
from medledger.services.fhir import dump_resource
from medledger.services.keys import InstitutionKeys
from medledger.services.records.model import RecordChain, SealedWrite, StoredResource, instant
from medledger.services.search import patient_reference, resource_tokens
from medledger.storage.batching import GroupCommitter
from medledger.storage.ports import BlobStore, VersionRow

__all__ = ["PreparedWrite", "Sealer"]

#: Resources of at least this many bytes are tokenized and sealed off the event loop
#: (below it, the hand-off to a thread costs more than the work).
OFFLOAD_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class PreparedWrite:
    """A version sealed, its blob not yet stored (nothing may name it until it is)."""

    sealed: SealedWrite
    #: The ciphertext to store; its hash is ``sealed.row.blob_hash``.
    blob: bytes = field(repr=False)


class Sealer:
    """Seals versions with fresh data keys and stores their blobs."""

    def __init__(
        self,
        *,
        institution: str,
        chain: RecordChain,
        blobs: BlobStore,
        keys: InstitutionKeys,
        clock: Clock,
        random_bytes: Callable[[int], bytes],
        sign_tx: Callable[[Transaction], Transaction] | None,
        stamp_chain_base: bool,
    ) -> None:
        """``sign_tx``: only the consortium-only benchmark mode signs record transactions.
        ``stamp_chain_base``: rows carry the chain's durable height for crash recovery."""
        self._institution = institution
        self._chain = chain
        self._blobs = blobs
        self._keys = keys
        self._clock = clock
        self._random = random_bytes
        self._sign_tx = sign_tx
        self._stamp_chain_base = stamp_chain_base
        # Blobs of concurrent writes share one file-system flush.
        self._blob_writes: GroupCommitter[bytes] = GroupCommitter(
            self._put_blobs, name="medledger-blobs"
        )

    async def seal(
        self,
        rtype: str,
        rid: str,
        version: int,
        resource: dict[str, Any],
        kek_id: str,
        kek: bytes,
        *,
        deletion_of: VersionRow | None = None,
    ) -> SealedWrite:
        """Seal ``resource`` as ``version`` of ``rtype/rid`` and store its blob durably.

        The returned row and transaction are not yet indexed or committed.
        Arguments as :meth:`prepare`.
        """
        prepared = await self.prepare(
            rtype, rid, version, resource, kek_id, kek, deletion_of=deletion_of
        )
        await self.store(prepared)
        return prepared.sealed

    async def store(self, prepared: PreparedWrite) -> None:
        """Store ``prepared``'s blob; return once it is durable (one flush shared with
        the blobs of concurrent writes). On failure none of the batch is left behind."""
        await self._blob_writes.submit(prepared.blob)

    async def prepare(
        self,
        rtype: str,
        rid: str,
        version: int,
        resource: dict[str, Any],
        kek_id: str,
        kek: bytes,
        *,
        deletion_of: VersionRow | None = None,
    ) -> PreparedWrite:
        """Seal ``resource`` as ``version`` of ``rtype/rid``: its blob, row and transaction.

        Nothing is stored: :meth:`store` must make the blob durable before
        anything that names it is committed.
        ``deletion_of``: this version deletes the resource whose current version
        is that row — it is sealed like any other (blob, data key, ``record.put``)
        so every check of a stored version holds for it, but it has no search
        tokens and keeps the deleted version's patient, so the deletion is in
        that patient's trail and no search finds the resource any more.
        """
        now = self._clock.now_ms()
        meta = dict(resource.get("meta") or {})
        meta.update(versionId=str(version), lastUpdated=instant(now))
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
        tokens: set[bytes]
        if deletion_of is not None:
            tokens, blob = set(), seal_record(dek, nonce, data, context)
        elif len(data) >= OFFLOAD_BYTES:
            tokens, blob = await asyncio.to_thread(
                self._tokens_and_blob, final, dek, nonce, data, context
            )
        else:
            tokens, blob = self._tokens_and_blob(final, dek, nonce, data, context)
        blob_hash = sha256(blob)
        pseudonym = (
            deletion_of.patient
            if deletion_of is not None
            else self._keys.pseudonym(patient_reference(final))
        )
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
            chain_base=self._chain.durable_height if self._stamp_chain_base else None,
            deleted=deletion_of is not None,
        )
        stored = StoredResource(
            resource_type=rtype,
            id=rid,
            version=version,
            last_updated=instant(now),
            data=data,
            tx_hash=row.tx_hash,
            patient=pseudonym,
        )
        return PreparedWrite(SealedWrite(row=row, tokens=tokens, stored=stored, tx=tx), blob)

    async def close(self) -> None:
        await self._blob_writes.close()

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

    def _put_blobs(self, blobs: Sequence[bytes]) -> list[BaseException | None]:
        self._blobs.put_many(blobs)
        return [None] * len(blobs)
