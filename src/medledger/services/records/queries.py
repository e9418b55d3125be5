"""Search over the blind index: the latest unerased versions matching every parameter."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from medledger.ledger.clock import Clock
from medledger.services.keys import InstitutionKeys
from medledger.services.records.model import StoredResource
from medledger.services.records.reading import RecordReader
from medledger.services.search import evaluate, query_tokens
from medledger.storage.ports import RecordIndex, VersionRow

__all__ = ["RecordSearch"]


class RecordSearch:
    """Searches (blocking: index reads and decryption; callers run it in a worker thread)."""

    def __init__(
        self, *, index: RecordIndex, keys: InstitutionKeys, reader: RecordReader, clock: Clock
    ) -> None:
        self._clock = clock
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
        # "Today" only sets the tolerance of a date search's ``ap`` prefix.
        today = datetime.fromtimestamp(self._clock.now_ms() / 1000, UTC).date()
        query = query_tokens(self._keys.search_key, resource_type, params, today=today)

        def every() -> set[str]:
            return {
                r.id
                for r in self._index.type_history(resource_type, 10**9)
                if not (r.erased or r.deleted)
            }

        def find(groups: list[frozenset[bytes]]) -> set[str]:
            return set(self._index.search(resource_type, [set(g) for g in groups]))

        ids = sorted(evaluate(query, find=find, every=every))
        rows = []
        for rid in ids:
            row = self._index.latest(resource_type, rid)
            if row is not None and not row.erased and not row.deleted:
                rows.append(row)
        return rows
