"""PostgreSQL adapter of :class:`~medledger.storage.ports.BlobStore`: a content-addressed ``bytea`` table."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from medledger.core.errors import (
    IntegrityError,
    NotFound,
)
from medledger.core.hashing import sha256
from medledger.storage.postgres.connection import PooledStore, open_pool
from medledger.storage.postgres.migrations import open_schema

__all__ = ["PostgresBlobStore"]


class PostgresBlobStore(PooledStore):
    """:class:`~medledger.storage.ports.BlobStore` as a ``bytea`` table.

    ``put_many`` writes a batch in one transaction (durable when it returns);
    ``get`` re-hashes what it reads and raises :class:`IntegrityError` for
    altered bytes, like the filesystem store.
    """

    @classmethod
    def initialize(cls, dsn: str, *, schema: str) -> None:
        """Create an empty blob table in ``schema`` (which must hold no medledger store)."""
        open_schema(dsn, schema, "blobs", create=True)

    def __init__(self, dsn: str, *, schema: str, pool_size: int = 4) -> None:
        open_schema(dsn, schema, "blobs", create=False)
        super().__init__(dsn, schema, open_pool(dsn, schema, max_size=pool_size, name=schema))

    def put(self, data: bytes) -> bytes:
        return self.put_many([data])[0]

    def put_many(self, blobs: Sequence[bytes]) -> list[bytes]:
        hashes = [sha256(b) for b in blobs]
        if not blobs:
            return hashes
        with self._conn() as conn, conn.transaction(), conn.cursor() as cur:
            cur.executemany(
                b"INSERT INTO blobs (hash, data) VALUES (%s, %s) ON CONFLICT (hash) DO NOTHING",
                list(zip(hashes, blobs, strict=True)),
            )
        return hashes

    def get(self, blob_hash: bytes) -> bytes:
        rows = self._rows("SELECT data FROM blobs WHERE hash = %s", (blob_hash,))
        if not rows:
            raise NotFound(f"blob {blob_hash.hex()[:16]}… is not stored")
        data = bytes(rows[0][0])
        if sha256(data) != blob_hash:
            raise IntegrityError(f"blob {blob_hash.hex()[:16]}… does not match its hash")
        return data

    def delete(self, blob_hash: bytes) -> None:
        self._rows("DELETE FROM blobs WHERE hash = %s RETURNING 1", (blob_hash,))

    def exists(self, blob_hash: bytes) -> bool:
        return bool(self._rows("SELECT 1 FROM blobs WHERE hash = %s", (blob_hash,)))

    def iter_hashes(self, *, older_than: float | None = None) -> Iterator[bytes]:
        """Every stored hash, in pages. Rows carry no write time, so none is provably older
        than ``older_than``: with it, nothing is listed (an orphan sweep removes nothing)."""
        if older_than is not None:
            return
        after = b""
        while True:
            rows = self._rows(
                "SELECT hash FROM blobs WHERE hash > %s ORDER BY hash LIMIT 1000", (after,)
            )
            if not rows:
                return
            for (blob_hash,) in rows:
                yield bytes(blob_hash)
            after = bytes(rows[-1][0])

    def close(self) -> None:
        self._close_pool()
