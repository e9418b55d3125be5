"""Which stored resources are a patient's, decided from the index's keyed pseudonyms alone."""

from __future__ import annotations

import hmac

from medledger.services.keys import InstitutionKeys
from medledger.storage.ports import RecordIndex

__all__ = ["PatientRecords"]


class PatientRecords:
    """A patient's resources by pseudonym (blocking: index reads; nothing decrypted)."""

    def __init__(self, *, index: RecordIndex, keys: InstitutionKeys) -> None:
        self._index = index
        self._keys = keys

    def pseudonym(self, patient_id: str) -> str:
        """The keyed pseudonym the chain and the index know ``Patient/<patient_id>`` by."""
        pseudonym = self._keys.pseudonym(f"Patient/{patient_id}")
        assert pseudonym is not None
        return pseudonym

    def patient_of_pseudonym(self, pseudonym: str) -> str | None:
        """The id of the stored Patient whose keyed pseudonym is ``pseudonym``, if any."""
        for rtype, rid in self._index.records_of_patient(pseudonym):
            if rtype == "Patient" and self.pseudonym(rid) == pseudonym:
                return rid
        return None

    def may_read(
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
        expected = self.pseudonym(patient_id).encode()
        if whole_history:
            rows = self._index.history(resource_type, rid)
        else:
            row = (
                self._index.latest(resource_type, rid)
                if version is None
                else self._index.get_version(resource_type, rid, version)
            )
            rows = [] if row is None else [row]
        readable = [r for r in rows if not r.erased and not r.deleted]
        theirs = [hmac.compare_digest((r.patient or "").encode(), expected) for r in readable]
        if theirs and all(theirs):
            return True, None
        return False, next((r.patient for r in rows if r.patient), None)

    def resources_of(self, patient_id: str) -> list[tuple[str, str]]:
        """``(type, id)`` of every unerased resource about ``Patient/<patient_id>``."""
        candidates = [("Patient", patient_id)]
        candidates += self._index.records_of_patient(self.pseudonym(patient_id))
        return [
            key
            for key in dict.fromkeys(candidates)  # each once, in order
            if (row := self._index.latest(*key)) is not None and not row.erased and not row.deleted
        ]
