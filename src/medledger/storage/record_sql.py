"""The record index's SQL, written once for SQLite and PostgreSQL, and the reads both share.

Both adapters keep the same tables (``versions``, ``tokens``, ``meta``), so
every statement is written here once, with ``?`` placeholders; a
:class:`Dialect` renders it for its driver. What differs between the
backends is only how a batch of writes becomes one transaction (SQLite:
``BEGIN IMMEDIATE`` on the writer connection; PostgreSQL: a pipelined
transaction on a pooled connection) — that stays in each adapter.

:class:`RecordReads` implements every read of the
:class:`~medledger.storage.ports.RecordIndex` port on top of one hook,
``_select``, so the two adapters cannot drift: search resolves the group
that matches the fewest stored tokens first (counted selectivity), and a
version outside the ``int4`` range is simply absent on both.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from medledger.core.errors import StorageError
from medledger.storage.batching import GroupCommitter
from medledger.storage.dialect import POSTGRES, SQLITE, Dialect
from medledger.storage.ports import RECOVERY_MARK, VersionRow

__all__ = [
    "COLUMNS",
    "MAX_VERSION",
    "POSTGRES",
    "SQLITE",
    "Dialect",
    "RecordQueries",
    "RecordReads",
    "RecordWrites",
    "version_params",
    "version_row",
]

#: The ``versions`` columns, in :class:`VersionRow` order.
COLUMNS: Final = (
    "rtype, rid, version, blob_hash, wrapped_dek, kek_id, patient, updated_ms, tx_hash, erased,"
    " chain_base, deleted"
)
#: Versions are ``integer`` (``int4``) in PostgreSQL; no stored version lies outside it.
MIN_VERSION: Final = -(2**31)
MAX_VERSION: Final = 2**31 - 1
#: Larger integers cannot be bound (SQLite INTEGER and PostgreSQL bigint are 64-bit).
_MAX_INT: Final = 2**62
#: Tokens (and candidate ids) per statement: far below both backends' parameter limits.
_CHUNK: Final = 400
_PAGE: Final = 1000
#: The first limit a search counts each group's stored tokens up to.
_FIRST_COUNT_LIMIT: Final = 64


@dataclass(frozen=True, slots=True)
class RecordQueries:
    """Every statement of the record index, rendered for one dialect."""

    dialect: Dialect
    insert_version: str
    delete_version: str
    delete_tokens: str
    insert_token: str
    set_meta: str
    delete_meta: str
    erase_select: str
    erase_update: str
    rewrap_select: str
    rewrap_update: str
    latest: str
    get_version: str
    history: str
    type_history: str
    versions_since: str
    unsettled: str
    max_chain_base: str
    get_meta: str
    page_versions: str
    records_of_patient: str
    count_wrapped_by: str
    insert_pending: str
    delete_pending: str
    delete_pending_of: str
    settle_check: str
    pending: str

    @classmethod
    def for_dialect(cls, d: Dialect) -> RecordQueries:
        r = d.render
        marks = ", ".join("?" * len(COLUMNS.split(",")))
        return cls(
            dialect=d,
            insert_version=r(f"INSERT INTO versions ({COLUMNS}) VALUES ({marks})"),
            delete_version=r("DELETE FROM versions WHERE rtype = ? AND rid = ? AND version = ?"),
            delete_tokens=r("DELETE FROM tokens WHERE rtype = ? AND rid = ?"),
            insert_token=r("INSERT INTO tokens (token, rtype, rid) VALUES (?, ?, ?)"),
            # ON CONFLICT … DO UPDATE: PostgreSQL 9.5+, SQLite 3.24+.
            set_meta=r(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
            ),
            delete_meta=r("DELETE FROM meta WHERE key = ?"),
            erase_select=r("SELECT blob_hash FROM versions WHERE rtype = ? AND rid = ?")
            + d.lock_rows,
            erase_update=r(
                "UPDATE versions SET wrapped_dek = NULL, kek_id = NULL, erased = TRUE"
                " WHERE rtype = ? AND rid = ?"
            ),
            rewrap_select=r(f"SELECT {COLUMNS} FROM versions WHERE kek_id = ? LIMIT 2000"),
            rewrap_update=r(
                "UPDATE versions SET wrapped_dek = ?, kek_id = ? WHERE rtype = ?"
                " AND rid = ? AND version = ? AND kek_id IS NOT NULL"
            ),
            latest=r(
                f"SELECT {COLUMNS} FROM versions WHERE rtype = ? AND rid = ?"
                " ORDER BY version DESC LIMIT 1"
            ),
            get_version=r(
                f"SELECT {COLUMNS} FROM versions WHERE rtype = ? AND rid = ? AND version = ?"
            ),
            history=r(
                f"SELECT {COLUMNS} FROM versions WHERE rtype = ? AND rid = ? ORDER BY version DESC"
            ),
            type_history=r(
                f"SELECT {COLUMNS} FROM versions WHERE rtype = ? ORDER BY updated_ms DESC LIMIT ?"
            ),
            versions_since=r(
                f"SELECT {COLUMNS} FROM versions WHERE updated_ms >= ? ORDER BY updated_ms DESC"
            ),
            unsettled=r(
                f"SELECT {COLUMNS} FROM versions WHERE chain_base >= ?"
                " ORDER BY chain_base, rtype, rid, version"
            ),
            max_chain_base="SELECT MAX(chain_base) FROM versions",
            get_meta=r("SELECT value FROM meta WHERE key = ?"),
            page_versions=r(
                f"SELECT {COLUMNS} FROM versions WHERE (rtype, rid, version) > (?, ?, ?)"
                f" ORDER BY rtype, rid, version LIMIT {_PAGE}"
            ),
            records_of_patient=r("SELECT DISTINCT rtype, rid FROM versions WHERE patient = ?"),
            count_wrapped_by=r("SELECT COUNT(*) FROM versions WHERE kek_id = ?"),
            insert_pending=r("INSERT INTO pending_tokens (rtype, rid, version) VALUES (?, ?, ?)"),
            delete_pending=r(
                "DELETE FROM pending_tokens WHERE rtype = ? AND rid = ? AND version = ?"
            ),
            delete_pending_of=r("DELETE FROM pending_tokens WHERE rtype = ? AND rid = ?"),
            # A settling version replaces the resource's tokens only while it is pending
            # (not taken back, not erased) and no newer version was added.
            settle_check=r(
                "SELECT 1 FROM pending_tokens WHERE rtype = ? AND rid = ? AND version = ?"
                " AND NOT EXISTS (SELECT 1 FROM versions WHERE rtype = ? AND rid = ?"
                " AND version > ?)"
            ),
            pending=r(
                "SELECT rtype, rid, version FROM pending_tokens ORDER BY rtype, rid, version"
            ),
        )

    def count_tokens(self, tokens: int) -> str:
        """How many stored tokens of a type are among ``tokens`` given ones, up to a limit.

        The limit (the last parameter) keeps counting a common token from
        reading every record that holds it.
        """
        return self.dialect.render(
            "SELECT COUNT(*) FROM (SELECT 1 FROM tokens WHERE rtype = ?"
            f" AND token IN ({_marks(tokens)}) LIMIT ?) AS capped"
        )

    def latest_of(self, rids: int) -> str:
        """The latest version of each of ``rids`` ids of a type (one primary-key probe each)."""
        return self.dialect.render(
            f"SELECT {COLUMNS} FROM versions AS v WHERE rtype = ? AND rid IN ({_marks(rids)})"
            " AND version = (SELECT MAX(version) FROM versions"
            " WHERE rtype = v.rtype AND rid = v.rid)"
        )

    def ids_with_tokens(self, tokens: int, candidates: int = 0) -> str:
        """Ids of a type holding one of ``tokens`` tokens (among ``candidates`` ids, if any).

        An id holding several of the tokens comes back once per token: the
        caller collects them in a set. No ``DISTINCT``: to return distinct
        ids without sorting, SQLite's planner walked ``tokens_by_record`` over
        *every* token of the type (rid order) instead of looking the tokens up
        in ``tokens_by_token`` — a search then read the whole type, its cost
        growing with the store instead of with what it matches. Without it,
        the lookup uses the index matching the most columns on both backends:
        ``tokens_by_token`` (token, type), or ``tokens_by_record`` (type, id)
        among candidates, whose rows are bounded by the candidates.
        """
        among = f" AND rid IN ({_marks(candidates)})" if candidates else ""
        return self.dialect.render(
            f"SELECT rid FROM tokens WHERE rtype = ? AND token IN ({_marks(tokens)})" + among
        )


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def version_row(r: Sequence[Any]) -> VersionRow:
    """A :class:`VersionRow` from a row of :data:`COLUMNS`."""
    return VersionRow(
        resource_type=str(r[0]),
        id=str(r[1]),
        version=int(r[2]),
        blob_hash=bytes(r[3]),
        wrapped_dek=None if r[4] is None else bytes(r[4]),
        kek_id=r[5],
        patient=r[6],
        updated_ms=int(r[7]),
        tx_hash=bytes(r[8]),
        erased=bool(r[9]),
        chain_base=None if r[10] is None else int(r[10]),
        deleted=bool(r[11]),
    )


def version_params(row: VersionRow) -> tuple[Any, ...]:
    """The parameters of ``insert_version`` (flags as booleans: both drivers bind them)."""
    return (*row.values()[:9], bool(row.erased), row.chain_base, bool(row.deleted))


def _chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


class RecordReads:
    """Every read of the :class:`~medledger.storage.ports.RecordIndex` port, for both backends.

    An adapter sets ``_queries`` and implements :meth:`_select` (run one
    statement on a reader, map backend errors to ``StorageError``).
    """

    _queries: RecordQueries

    @abstractmethod
    def _select(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """Rows of one read-only statement."""

    def latest(self, resource_type: str, rid: str) -> VersionRow | None:
        rows = self._select(self._queries.latest, (resource_type, rid))
        return version_row(rows[0]) if rows else None

    def latest_of(self, resource_type: str, rids: Sequence[str]) -> dict[str, VersionRow]:
        """The latest version of each of ``rids`` that exists: one statement per
        :data:`_CHUNK` ids, not one per id (a search reads its matches' rows at once)."""
        found: dict[str, VersionRow] = {}
        for chunk in _chunks(sorted(set(rids))):
            for r in self._select(self._queries.latest_of(len(chunk)), (resource_type, *chunk)):
                latest = version_row(r)
                found[latest.id] = latest
        return found

    def get_version(self, resource_type: str, rid: str, version: int) -> VersionRow | None:
        """The version, or ``None`` — also for a number no backend can store (outside int4)."""
        if not MIN_VERSION <= version <= MAX_VERSION:
            return None
        rows = self._select(self._queries.get_version, (resource_type, rid, version))
        return version_row(rows[0]) if rows else None

    def history(self, resource_type: str, rid: str) -> list[VersionRow]:
        return [version_row(r) for r in self._select(self._queries.history, (resource_type, rid))]

    def type_history(self, resource_type: str, limit: int) -> list[VersionRow]:
        rows = self._select(self._queries.type_history, (resource_type, min(limit, _MAX_INT)))
        return [version_row(r) for r in rows]

    def versions_since(self, updated_ms: int) -> list[VersionRow]:
        """Every version written at or after ``updated_ms``, newest first (crash recovery)."""
        if updated_ms > _MAX_INT:
            return []
        rows = self._select(self._queries.versions_since, (max(updated_ms, -_MAX_INT),))
        return [version_row(r) for r in rows]

    def unsettled(self, from_base: int) -> list[VersionRow]:
        """Versions indexed on chain height ``from_base`` or later, oldest first (crash recovery)."""
        if from_base > _MAX_INT:
            return []
        rows = self._select(self._queries.unsettled, (max(from_base, -_MAX_INT),))
        return [version_row(r) for r in rows]

    def max_chain_base(self) -> int | None:
        """The highest chain height any version was indexed on (the chain held it durably)."""
        value = self._select(self._queries.max_chain_base)[0][0]
        return None if value is None else int(value)

    def recovery_mark(self) -> int:
        """Chain height from which versions may still be unsettled (0 if never recorded)."""
        rows = self._select(self._queries.get_meta, (RECOVERY_MARK,))
        return int(rows[0][0]) if rows else 0

    def meta(self, key: str) -> str | None:
        """A value the index keeps about itself (``None`` if never set)."""
        rows = self._select(self._queries.get_meta, (key,))
        return str(rows[0][0]) if rows else None

    def iter_versions(self) -> Iterator[VersionRow]:
        """Every version row in key order, read in pages (store checks and sweeps)."""
        after: tuple[str, str, int] = ("", "", -1)
        while True:
            rows = self._select(self._queries.page_versions, after)
            if not rows:
                return
            for r in rows:
                yield version_row(r)
            after = (str(rows[-1][0]), str(rows[-1][1]), int(rows[-1][2]))

    def search(self, resource_type: str, groups: list[set[bytes]]) -> list[str]:
        """Ids whose tokens match at least one token of every group.

        The group matching the fewest stored tokens is resolved first (counted,
        not guessed from the group's size); the others only check its
        candidates, so a common code does not drag in every record it matches.
        The work done grows with the rarest group's matches and the
        candidates, not with the store.
        """
        if not groups:
            return []
        # Counted up to a limit that grows eightfold until some group falls
        # below it: that group is the rarest, and no count read more than
        # eight times its matches (a common code is never counted in full).
        limit = _FIRST_COUNT_LIMIT
        while True:
            counts = [self._count(resource_type, g, limit) for g in groups]
            if min(counts) < limit:
                break
            limit *= 8
        order = sorted(range(len(groups)), key=counts.__getitem__)
        counted = [groups[i] for i in order]
        found = self._ids(resource_type, counted[0], None)
        for group in counted[1:]:
            if not found:
                return []
            found &= self._ids(resource_type, group, found)
        return sorted(found)

    def _count(self, resource_type: str, group: set[bytes], limit: int) -> int:
        """Stored tokens of ``group`` (of this type), counted up to ``limit``."""
        total = 0
        for chunk in _chunks(sorted(group)):
            sql = self._queries.count_tokens(len(chunk))
            total += int(self._select(sql, (resource_type, *chunk, limit - total))[0][0])
            if total >= limit:
                return limit
        return total

    def _ids(self, resource_type: str, group: set[bytes], among: set[str] | None) -> set[str]:
        ids: set[str] = set()
        for chunk in _chunks(sorted(group)):
            if among is None:
                sql = self._queries.ids_with_tokens(len(chunk))
                ids.update(str(r[0]) for r in self._select(sql, (resource_type, *chunk)))
                continue
            for cand in _chunks(sorted(among)):
                sql = self._queries.ids_with_tokens(len(chunk), len(cand))
                ids.update(str(r[0]) for r in self._select(sql, (resource_type, *chunk, *cand)))
        return ids

    def records_of_patient(self, pseudonym: str) -> list[tuple[str, str]]:
        return [
            (str(r[0]), str(r[1]))
            for r in self._select(self._queries.records_of_patient, (pseudonym,))
        ]

    def count_wrapped_by(self, kek_id: str) -> int:
        return int(self._select(self._queries.count_wrapped_by, (kek_id,))[0][0])

    def pending_tokens(self) -> list[tuple[str, str, int]]:
        """``(type, id, version)`` of every version whose tokens have not settled."""
        return [(str(r[0]), str(r[1]), int(r[2])) for r in self._select(self._queries.pending)]


class RecordWrites:
    """The writes of the :class:`~medledger.storage.ports.RecordIndex` port, for both
    backends: each is one operation handed to the adapter's group commit.

    An adapter sets ``_writes``, whose ``_apply`` runs a batch of ``(kind, argument)``
    operations (``put``, ``remove``, ``tokens``, ``settle``, ``mark``, ``meta``) in one
    transaction.
    """

    _writes: GroupCommitter[tuple[str, Any]]

    async def put_version(self, row: VersionRow, tokens: set[bytes] | None) -> None:
        """Add a version and make ``tokens`` the resource's search tokens; ``Conflict`` if taken.

        ``tokens=None``: the tokens follow (:meth:`settle_tokens`); the version is pending.
        """
        await self._writes.submit(("put", (row, tokens)))

    async def settle_tokens(self, row: VersionRow, tokens: set[bytes]) -> None:
        """A pending version's tokens (see the port: replaced only while it is current)."""
        await self._writes.submit(("settle", (row, tokens)))

    async def remove_version(self, resource_type: str, rid: str, version: int) -> None:
        """Undo a ``put_version`` whose chain commit failed."""
        await self._writes.submit(("remove", (resource_type, rid, version)))

    async def set_tokens(self, resource_type: str, rid: str, tokens: set[bytes]) -> None:
        """Make ``tokens`` the resource's search tokens (e.g. after undoing a failed write)."""
        await self._writes.submit(("tokens", (resource_type, rid, tokens)))

    async def set_recovery_mark(self, height: int) -> None:
        """Record that every version with ``chain_base < height`` is settled (durably)."""
        await self._writes.submit(("mark", height))

    async def set_meta(self, key: str, value: str | None) -> None:
        """Keep (durably) or, with ``None``, forget a value about the index."""
        if key == RECOVERY_MARK:
            raise StorageError("the recovery mark is set by set_recovery_mark")
        await self._writes.submit(("meta", (key, value)))
