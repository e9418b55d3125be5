"""PostgreSQL adapter of :class:`~medledger.storage.ports.RecordIndex`, group committed like SQLite's."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
import psycopg.errors

from medledger.core.errors import (
    Conflict,
    NotFound,
    StorageError,
)
from medledger.storage.batching import GroupCommitter
from medledger.storage.ports import RECOVERY_MARK, VersionRow
from medledger.storage.postgres.connection import MAX_KEY, PooledStore, open_pool, storage_error
from medledger.storage.postgres.migrations import open_schema

__all__ = ["PostgresRecordIndex"]


_COLS = (
    "rtype, rid, version, blob_hash, wrapped_dek, kek_id, patient, updated_ms, tx_hash, erased,"
    " chain_base"
)


def _version_row(r: Sequence[Any]) -> VersionRow:
    return VersionRow(
        resource_type=r[0],
        id=r[1],
        version=int(r[2]),
        blob_hash=bytes(r[3]),
        wrapped_dek=None if r[4] is None else bytes(r[4]),
        kek_id=r[5],
        patient=r[6],
        updated_ms=int(r[7]),
        tx_hash=bytes(r[8]),
        erased=bool(r[9]),
        chain_base=None if r[10] is None else int(r[10]),
    )


def _pg_values(row: VersionRow) -> tuple[Any, ...]:
    return (*row.values()[:9], bool(row.erased), row.chain_base)


class PostgresRecordIndex(PooledStore):
    """:class:`~medledger.storage.ports.RecordIndex` in one PostgreSQL schema.

    Writes are group committed: concurrent ``put_version`` / ``remove_version``
    calls become one transaction (pipelined statements, one commit); a call
    returns once its batch committed. A ``put_version`` of a version that is
    already stored gets :class:`Conflict` without failing the rest of its batch.
    """

    @classmethod
    def initialize(cls, dsn: str, *, schema: str) -> None:
        """Create an empty index in ``schema`` (which must hold no medledger store)."""
        open_schema(dsn, schema, "records", create=True)

    def __init__(self, dsn: str, *, schema: str, pool_size: int = 4) -> None:
        """Open the index in ``schema`` (applying pending migrations)."""
        open_schema(dsn, schema, "records", create=False)
        super().__init__(dsn, schema, open_pool(dsn, schema, max_size=pool_size, name=schema))
        self._writes: GroupCommitter[tuple[str, Any]] = GroupCommitter(
            self._apply, name="medledger-index-pg"
        )

    # -- writes ----------------------------------------------------------------

    def _apply(self, ops: Sequence[tuple[str, Any]]) -> list[BaseException | None]:
        results: list[BaseException | None] = [None] * len(ops)
        try:
            with self._pool.connection() as conn:
                keys = [(row.resource_type, row.id, row.version) for kind, (row, _) in _puts(ops)]
                taken: set[tuple[str, str, int]] = set()
                if keys:
                    taken = {
                        (str(a), str(b), int(c))
                        for a, b, c in conn.execute(
                            b"SELECT rtype, rid, version FROM versions WHERE (rtype, rid, version)"
                            b" IN (SELECT * FROM unnest(%s::text[], %s::text[], %s::int4[]))",
                            ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]),
                        ).fetchall()
                    }
                with conn.transaction(), conn.pipeline(), conn.cursor() as cur:
                    for i, (kind, arg) in enumerate(ops):
                        if kind == "put":
                            row, tokens = arg
                            key = (row.resource_type, row.id, row.version)
                            if key in taken:
                                results[i] = Conflict(
                                    f"{row.resource_type}/{row.id} version {row.version}"
                                    " already exists"
                                )
                                continue
                            taken.add(key)
                            cur.execute(
                                f"INSERT INTO versions ({_COLS}) VALUES"
                                " (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)".encode(),
                                _pg_values(row),
                            )
                            cur.execute(
                                b"DELETE FROM tokens WHERE rtype = %s AND rid = %s",
                                (row.resource_type, row.id),
                            )
                            if tokens:
                                cur.executemany(
                                    b"INSERT INTO tokens (token, rtype, rid) VALUES (%s, %s, %s)",
                                    [(t, row.resource_type, row.id) for t in tokens],
                                )
                        elif kind == "remove":
                            taken.discard(arg)
                            cur.execute(
                                b"DELETE FROM versions WHERE rtype = %s AND rid = %s"
                                b" AND version = %s",
                                arg,
                            )
                        elif kind == "tokens":
                            rtype, rid, tokens = arg
                            cur.execute(
                                b"DELETE FROM tokens WHERE rtype = %s AND rid = %s", (rtype, rid)
                            )
                            if tokens:
                                cur.executemany(
                                    b"INSERT INTO tokens (token, rtype, rid) VALUES (%s, %s, %s)",
                                    [(t, rtype, rid) for t in tokens],
                                )
                        elif kind == "mark":
                            cur.execute(
                                b"INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT (key)"
                                b" DO UPDATE SET value = EXCLUDED.value",
                                (RECOVERY_MARK, str(arg)),
                            )
                        else:
                            results[i] = StorageError(f"unknown index operation {kind}")
        except psycopg.Error as exc:
            err = storage_error(exc, self.where)
            return [err] * len(ops)
        return results

    async def put_version(self, row: VersionRow, tokens: set[bytes]) -> None:
        """Add a version and make ``tokens`` the resource's search tokens; ``Conflict`` if taken."""
        await self._writes.submit(("put", (row, tokens)))

    async def remove_version(self, resource_type: str, rid: str, version: int) -> None:
        """Undo a ``put_version`` whose chain commit failed."""
        await self._writes.submit(("remove", (resource_type, rid, version)))

    async def set_tokens(self, resource_type: str, rid: str, tokens: set[bytes]) -> None:
        """Make ``tokens`` the resource's search tokens (e.g. after undoing a failed write)."""
        await self._writes.submit(("tokens", (resource_type, rid, tokens)))

    async def set_recovery_mark(self, height: int) -> None:
        """Record that every version with ``chain_base < height`` is settled (durably)."""
        await self._writes.submit(("mark", height))

    async def erase(self, resource_type: str, rid: str) -> list[bytes]:
        """Destroy every wrapped data key and token of a resource; return its blob hashes.

        Then ``VACUUM``s both tables so the old row versions holding the wrapped
        keys are reclaimed (WAL segments keep them until recycled).
        """

        def run() -> list[bytes]:
            with self._conn() as conn:
                with conn.transaction():
                    rows = conn.execute(
                        b"SELECT blob_hash FROM versions WHERE rtype = %s AND rid = %s FOR UPDATE",
                        (resource_type, rid),
                    ).fetchall()
                    if not rows:
                        raise NotFound(f"{resource_type}/{rid} does not exist")
                    conn.execute(
                        b"UPDATE versions SET wrapped_dek = NULL, kek_id = NULL, erased = true"
                        b" WHERE rtype = %s AND rid = %s",
                        (resource_type, rid),
                    )
                    conn.execute(
                        b"DELETE FROM tokens WHERE rtype = %s AND rid = %s", (resource_type, rid)
                    )
                conn.execute(b"VACUUM versions, tokens")
                return [bytes(r[0]) for r in rows]

        result: list[bytes] = await self._writes.run_exclusive(run)
        return result

    async def rewrap(
        self, old_kek_id: str, new_kek_id: str, fn: Callable[[VersionRow], bytes]
    ) -> int:
        """Re-wrap every data key wrapped by ``old_kek_id`` (``fn`` gives the new wrapping)."""

        def run() -> int:
            done = 0
            with self._conn() as conn:
                while True:
                    rows = [
                        _version_row(r)
                        for r in conn.execute(
                            f"SELECT {_COLS} FROM versions WHERE kek_id = %s LIMIT 2000".encode(),
                            (old_kek_id,),
                        ).fetchall()
                    ]
                    if not rows:
                        break
                    updates = [(fn(r), new_kek_id, r.resource_type, r.id, r.version) for r in rows]
                    with conn.transaction(), conn.cursor() as cur:
                        cur.executemany(
                            b"UPDATE versions SET wrapped_dek = %s, kek_id = %s WHERE rtype = %s"
                            b" AND rid = %s AND version = %s AND kek_id IS NOT NULL",
                            updates,
                        )
                    done += len(rows)
                conn.execute(b"VACUUM versions")
            return done

        count: int = await self._writes.run_exclusive(run)
        return count

    # -- reads -----------------------------------------------------------------

    def latest(self, resource_type: str, rid: str) -> VersionRow | None:
        rows = self._rows(
            f"SELECT {_COLS} FROM versions WHERE rtype = %s AND rid = %s"
            " ORDER BY version DESC LIMIT 1",
            (resource_type, rid),
        )
        return _version_row(rows[0]) if rows else None

    def get_version(self, resource_type: str, rid: str, version: int) -> VersionRow | None:
        if not -(2**31) <= version < 2**31:
            return None
        rows = self._rows(
            f"SELECT {_COLS} FROM versions WHERE rtype = %s AND rid = %s AND version = %s",
            (resource_type, rid, version),
        )
        return _version_row(rows[0]) if rows else None

    def history(self, resource_type: str, rid: str) -> list[VersionRow]:
        return [
            _version_row(r)
            for r in self._rows(
                f"SELECT {_COLS} FROM versions WHERE rtype = %s AND rid = %s ORDER BY version DESC",
                (resource_type, rid),
            )
        ]

    def type_history(self, resource_type: str, limit: int) -> list[VersionRow]:
        return [
            _version_row(r)
            for r in self._rows(
                f"SELECT {_COLS} FROM versions WHERE rtype = %s ORDER BY updated_ms DESC LIMIT %s",
                (resource_type, min(limit, MAX_KEY)),
            )
        ]

    def versions_since(self, updated_ms: int) -> list[VersionRow]:
        """Every version written at or after ``updated_ms``, newest first (crash recovery)."""
        return [
            _version_row(r)
            for r in self._rows(
                f"SELECT {_COLS} FROM versions WHERE updated_ms >= %s ORDER BY updated_ms DESC",
                (updated_ms,),
            )
        ]

    def unsettled(self, from_base: int) -> list[VersionRow]:
        """Versions indexed on chain height ``from_base`` or later, oldest first (crash recovery)."""
        return [
            _version_row(r)
            for r in self._rows(
                f"SELECT {_COLS} FROM versions WHERE chain_base >= %s"
                " ORDER BY chain_base, rtype, rid, version",
                (from_base,),
            )
        ]

    def max_chain_base(self) -> int | None:
        """The highest chain height any version was indexed on (the chain held it durably)."""
        value = self._rows("SELECT max(chain_base) FROM versions")[0][0]
        return None if value is None else int(value)

    def recovery_mark(self) -> int:
        """Chain height from which versions may still be unsettled (0 if never recorded)."""
        rows = self._rows("SELECT value FROM meta WHERE key = %s", (RECOVERY_MARK,))
        return int(rows[0][0]) if rows else 0

    def iter_versions(self) -> Iterator[VersionRow]:
        """Every version row in key order, read in pages (store checks and sweeps)."""
        after: tuple[str, str, int] = ("", "", -1)
        while True:
            rows = self._rows(
                f"SELECT {_COLS} FROM versions WHERE (rtype, rid, version) > (%s, %s, %s)"
                " ORDER BY rtype, rid, version LIMIT 1000",
                after,
            )
            if not rows:
                return
            for r in rows:
                yield _version_row(r)
            after = (str(rows[-1][0]), str(rows[-1][1]), int(rows[-1][2]))

    def search(self, resource_type: str, groups: list[set[bytes]]) -> list[str]:
        """Ids whose tokens match at least one token of every group."""
        found: set[str] | None = None
        for group in sorted(groups, key=len):
            ids = {
                str(r[0])
                for r in self._rows(
                    "SELECT DISTINCT rid FROM tokens WHERE rtype = %s AND token = ANY(%s::bytea[])",
                    (resource_type, list(group)),
                )
            }
            found = ids if found is None else found & ids
            if not found:
                return []
        return sorted(found or ())

    def records_of_patient(self, pseudonym: str) -> list[tuple[str, str]]:
        return [
            (str(r[0]), str(r[1]))
            for r in self._rows(
                "SELECT DISTINCT rtype, rid FROM versions WHERE patient = %s", (pseudonym,)
            )
        ]

    def count_wrapped_by(self, kek_id: str) -> int:
        return int(self._rows("SELECT count(*) FROM versions WHERE kek_id = %s", (kek_id,))[0][0])

    async def close(self) -> None:
        await self._writes.close()
        self._close_pool()


def _puts(ops: Sequence[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    return ((kind, arg) for kind, arg in ops if kind == "put")
