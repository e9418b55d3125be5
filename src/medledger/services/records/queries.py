"""Search over the blind index: the latest unerased versions matching every parameter."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from medledger.services.keys import InstitutionKeys
from medledger.services.records.model import StoredResource
from medledger.services.records.reading import RecordReader
from medledger.services.search import query_tokens
from medledger.storage.ports import RecordIndex, VersionRow

__all__ = ["RecordSearch"]


class RecordSearch:
    """Searches (blocking: index reads and decryption; callers run it in a worker thread)."""

    def __init__(self, *, index: RecordIndex, keys: InstitutionKeys, reader: RecordReader) -> None:
        self._index = index
        self._keys = keys
        self._reader = reader

    def page(
        self,
        resource_type: str,
        params: Mapping[str, Sequence[str]],
        offset: int,
        count: int | None,
    ) -> tuple[int, list[StoredResource]]:
        """How many match, and those in ``[offset, offset + count)`` opened (only the page)."""
        rows = self.matching(resource_type, params)
        end = None if count is None else offset + count
        return len(rows), [self._reader.open(row) for row in rows[offset:end]]

    def matching(self, resource_type: str, params: Mapping[str, Sequence[str]]) -> list[VersionRow]:
        """The latest, unerased rows matching ``params`` (see ``services.search``)."""
        groups = query_tokens(self._keys.search_key, resource_type, params)
        ids = self._index.search(resource_type, groups) if groups else []
        if not groups:
            ids = [
                r.id
                for r in self._index.type_history(resource_type, 10**9)
                if not (r.erased or r.deleted)
            ]
            ids = sorted(set(ids))
        rows = []
        for rid in ids:
            row = self._index.latest(resource_type, rid)
            if row is not None and not row.erased and not row.deleted:
                rows.append(row)
        return rows
