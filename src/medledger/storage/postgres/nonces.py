"""PostgreSQL adapter of :class:`~medledger.storage.ports.NonceStore`: a PostgreSQL node's peer nonces.

Group-committed like the SQLite store: the nonces of requests arriving
together are recorded in one transaction (one statement), each durable
before the request it arrived with is served. Old nonces (outside the
clock-skew window) are pruned at most every ten seconds of request time.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import psycopg

from medledger.core.errors import StorageError
from medledger.storage.batching import GroupCommitter
from medledger.storage.nonces import PRUNE_EVERY_MS, NonceUse, replay
from medledger.storage.postgres.connection import PooledStore, open_pool, storage_error
from medledger.storage.postgres.migrations import open_or_create_schema, open_schema
from medledger.storage.sqlite.connection import sqlite_uri

__all__ = ["PostgresNonceStore"]


class PostgresNonceStore(PooledStore):
    """``(reader, nonce)`` pairs seen, in one PostgreSQL schema (created on first open)."""

    @classmethod
    def initialize(cls, dsn: str, *, schema: str) -> None:
        """Create an empty store in ``schema`` (which must hold no medledger store).

        A new node creates it with its other stores, so a schema left by an
        earlier node of the same name is refused instead of inherited.
        """
        open_schema(dsn, schema, "nonces", create=True)

    def __init__(self, dsn: str, *, schema: str, pool_size: int = 2) -> None:
        open_or_create_schema(dsn, schema, "nonces")
        super().__init__(dsn, schema, open_pool(dsn, schema, max_size=pool_size, name=schema))
        self._pruned_ms = 0
        self._writes: GroupCommitter[NonceUse] = GroupCommitter(
            self._apply, name="medledger-nonces-pg"
        )

    async def remember(
        self, reader: str, nonce: str, time_ms: int, *, forget_before_ms: int
    ) -> None:
        """Record a nonce; raise :class:`InvalidInput` if ``reader`` used it before."""
        await self._writes.submit(NonceUse(reader, nonce, time_ms, forget_before_ms))

    def _apply(self, ops: Sequence[NonceUse]) -> list[BaseException | None]:
        """One transaction for every queued nonce (runs on the writer thread)."""
        try:
            with self._pool.connection() as conn, conn.transaction():
                forget = max(op.forget_before_ms for op in ops)
                if forget - self._pruned_ms > PRUNE_EVERY_MS:
                    conn.execute(b"DELETE FROM nonces WHERE time_ms < %s", (forget,))
                inserted = {
                    (str(r), str(n))
                    for r, n in conn.execute(
                        b"INSERT INTO nonces (reader, nonce, time_ms)"
                        b" SELECT * FROM unnest(%s::text[], %s::text[], %s::int8[])"
                        b" ON CONFLICT DO NOTHING RETURNING reader, nonce",
                        (
                            [op.reader for op in ops],
                            [op.nonce for op in ops],
                            [op.time_ms for op in ops],
                        ),
                    ).fetchall()
                }
        except psycopg.Error as exc:
            err = storage_error(exc, f"{self.where}: cannot record the request nonce")
            return [err] * len(ops)
        if forget - self._pruned_ms > PRUNE_EVERY_MS:
            self._pruned_ms = forget
        results: list[BaseException | None] = []
        for op in ops:
            key = (op.reader, op.nonce)
            if key in inserted:
                inserted.discard(key)  # a second use in the same batch is a replay too
                results.append(None)
            else:
                results.append(replay())
        return results

    def import_legacy(self, path: Path) -> int:
        """Copy the nonces of ``path`` (SQLite) here; rename it (old ones are pruned as usual).

        So a request captured just before a node moved its nonces here cannot
        be replayed just after. Idempotent; the file is renamed ``*.imported``
        once the rows committed.
        """
        if not path.exists():
            return 0
        try:
            conn = sqlite3.connect(sqlite_uri(path, "rw"), uri=True)
            try:
                rows = conn.execute("SELECT reader, nonce, time_ms FROM nonces").fetchall()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StorageError(
                f"cannot import peer nonces from {path} ({exc}); the file is left as it is"
            ) from None
        with self._conn() as pg, pg.transaction():
            added = pg.execute(
                b"INSERT INTO nonces (reader, nonce, time_ms)"
                b" SELECT * FROM unnest(%s::text[], %s::text[], %s::int8[])"
                b" ON CONFLICT DO NOTHING",
                ([r[0] for r in rows], [r[1] for r in rows], [int(r[2]) for r in rows]),
            ).rowcount
        path.replace(path.with_name(path.name + ".imported"))
        return max(added, 0)

    async def close(self) -> None:
        await self._writes.close()
        self._close_pool()

    def close_now(self) -> None:
        """Close a store that never ran a write (outside an event loop: opening failed)."""
        self._close_pool()
