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
from medledger.storage.dialect import POSTGRES
from medledger.storage.ports import RECOVERY_MARK, VersionRow
from medledger.storage.postgres.connection import PooledStore, open_pool, storage_error
from medledger.storage.postgres.migrations import open_schema
from medledger.storage.record_sql import (
    RecordQueries,
    RecordReads,
    RecordWrites,
    version_params,
    version_row,
)

__all__ = ["PostgresRecordIndex"]


_QUERIES = RecordQueries.for_dialect(POSTGRES)


class PostgresRecordIndex(PooledStore, RecordReads, RecordWrites):
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
        self._queries = _QUERIES
        self._writes: GroupCommitter[tuple[str, Any]] = GroupCommitter(
            self._apply, name="medledger-index-pg"
        )

    # -- writes ----------------------------------------------------------------

    def _apply(self, ops: Sequence[tuple[str, Any]]) -> list[BaseException | None]:
        results: list[BaseException | None] = [None] * len(ops)
        q = _QUERIES
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
                # Which settling versions are still current: read before the pipeline (this
                # thread is the index's only writer, so nothing changes in between).
                current = {
                    i
                    for i, (kind, arg) in enumerate(ops)
                    if kind == "settle" and _settles(conn, arg[0])
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
                            cur.execute(q.insert_version, version_params(row))
                            if tokens is None:  # its tokens follow ("settle")
                                cur.execute(q.insert_pending, key)
                                continue
                            cur.execute(q.delete_tokens, (row.resource_type, row.id))
                            if tokens:
                                cur.executemany(
                                    q.insert_token,
                                    [(t, row.resource_type, row.id) for t in tokens],
                                )
                        elif kind == "settle":
                            row, tokens = arg
                            cur.execute(q.delete_pending, (row.resource_type, row.id, row.version))
                            if i in current:
                                cur.execute(q.delete_tokens, (row.resource_type, row.id))
                                if tokens:
                                    cur.executemany(
                                        q.insert_token,
                                        [(t, row.resource_type, row.id) for t in tokens],
                                    )
                        elif kind == "remove":
                            taken.discard(arg)
                            cur.execute(q.delete_version, arg)
                            cur.execute(q.delete_pending, arg)
                        elif kind == "tokens":
                            rtype, rid, tokens = arg
                            cur.execute(q.delete_tokens, (rtype, rid))
                            if tokens:
                                cur.executemany(q.insert_token, [(t, rtype, rid) for t in tokens])
                        elif kind == "mark":
                            cur.execute(q.set_meta, (RECOVERY_MARK, str(arg)))
                        elif kind == "meta":
                            key, value = arg
                            if value is None:
                                cur.execute(q.delete_meta, (key,))
                            else:
                                cur.execute(q.set_meta, (key, value))
                        else:
                            results[i] = StorageError(f"unknown index operation {kind}")
        except psycopg.Error as exc:
            err = storage_error(exc, self.where)
            return [err] * len(ops)
        return results

    async def erase(self, resource_type: str, rid: str) -> list[bytes]:
        """Destroy every wrapped data key and token of a resource; return its blob hashes.

        Then ``VACUUM``s both tables so the old row versions holding the wrapped
        keys are reclaimed (WAL segments keep them until recycled).
        """

        def run() -> list[bytes]:
            with self._conn() as conn:
                with conn.transaction():
                    rows = conn.execute(_QUERIES.erase_select, (resource_type, rid)).fetchall()
                    if not rows:
                        raise NotFound(f"{resource_type}/{rid} does not exist")
                    conn.execute(_QUERIES.erase_update, (resource_type, rid))
                    conn.execute(_QUERIES.delete_tokens, (resource_type, rid))
                    conn.execute(_QUERIES.delete_pending_of, (resource_type, rid))
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
                        version_row(r)
                        for r in conn.execute(_QUERIES.rewrap_select, (old_kek_id,)).fetchall()
                    ]
                    if not rows:
                        break
                    updates = [(fn(r), new_kek_id, r.resource_type, r.id, r.version) for r in rows]
                    with conn.transaction(), conn.cursor() as cur:
                        cur.executemany(_QUERIES.rewrap_update, updates)
                    done += len(rows)
                conn.execute(b"VACUUM versions")
            return done

        count: int = await self._writes.run_exclusive(run)
        return count

    # -- reads (the statements and their use: record_sql.RecordReads) -----------

    def _select(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return self._rows(sql, args)

    async def close(self) -> None:
        await self._writes.close()
        self._close_pool()


def _puts(ops: Sequence[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    return ((kind, arg) for kind, arg in ops if kind == "put")


def _settles(conn: psycopg.Connection[Any], row: VersionRow) -> bool:
    """Whether a settling version is still pending and its resource's latest."""
    key = (row.resource_type, row.id, row.version)
    return conn.execute(_QUERIES.settle_check, (*key, *key)).fetchone() is not None
