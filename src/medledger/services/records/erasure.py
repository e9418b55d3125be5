"""Erasure: crypto-shred every version of a resource and append a ``record.erase`` tombstone.

The wrapped data keys and blobs are deleted; the chain keeps only the
tombstone (type, keyed ref, number of versions, patient pseudonym).
"""

from __future__ import annotations

import asyncio

from medledger.core.errors import Gone, NotFound
from medledger.core.transactions import RECORD_ERASE
from medledger.services.fhir import validate_id
from medledger.services.keys import InstitutionKeys
from medledger.services.records.model import RecordChain
from medledger.services.records.writes import RecordWriter
from medledger.storage.ports import BlobStore, RecordIndex

__all__ = ["RecordEraser"]


class RecordEraser:
    """Erases resources, under the same per-resource locks as writes."""

    def __init__(
        self,
        *,
        chain: RecordChain,
        index: RecordIndex,
        blobs: BlobStore,
        keys: InstitutionKeys,
        writer: RecordWriter,
    ) -> None:
        self._chain = chain
        self._index = index
        self._blobs = blobs
        self._keys = keys
        self._writer = writer

    async def erase(self, resource_type: str, rid: str) -> int:
        """Erase every version of ``resource_type/rid``; returns how many versions."""
        validate_id(rid)
        async with self._writer.lock(resource_type, rid):
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
