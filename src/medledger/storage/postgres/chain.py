"""PostgreSQL adapter of :class:`~medledger.storage.ports.ChainStore`: the same tables and keys as SQLite."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import psycopg.errors
from psycopg_pool import ConnectionPool

from medledger.core.errors import (
    Conflict,
    Deposed,
    InvalidInput,
    NotFound,
    RetryableStorageError,
    StorageError,
)
from medledger.core.hashing import sha256
from medledger.core.merkle import NodeID, leaf_hash
from medledger.storage.chain_layout import hkey, node_from_key, node_key, stored_block
from medledger.storage.ports import NewBlock, StoredBlock
from medledger.storage.postgres.connection import (
    IN_DOUBT_TIMEOUT_S,
    MAX_KEY,
    POOL_TIMEOUT_S,
    Conn,
    PooledStore,
    connect_kwargs,
    open_pool,
    reason,
    schema_name,
    schema_where,
    set_session,
    storage_error,
)
from medledger.storage.postgres.migrations import open_schema

__all__ = ["PostgresChainStore"]

_BLOCK_SELECT = (
    "SELECT b.height, b.hash, b.header, b.signatures, b.first_index,"
    " ARRAY(SELECT t.data FROM txs t WHERE t.idx >= b.first_index"
    " AND t.idx < b.first_index + b.tx_count ORDER BY t.idx) FROM blocks b"
)


class PostgresChainStore(PooledStore):
    """A chain in one PostgreSQL schema. Create with :meth:`create`, open with :meth:`open`.

    Thread-safe: writes are serialized per handle (and by the height check
    across handles and processes); reads use any pooled connection. Each read
    is one statement, so it sees whole blocks only.
    """

    def __init__(self, dsn: str, schema: str, chain: str, pool: ConnectionPool[Conn]) -> None:
        super().__init__(dsn, schema, pool)
        self.chain = chain
        self._write_lock = threading.Lock()
        #: The sequencer lease's epoch every append must still see (:meth:`fence`), if any.
        self._epoch: int | None = None

    @staticmethod
    def default_schema(chain: str) -> str:
        """A schema name for ``chain`` when the caller gives none."""
        return schema_name("chain", chain)

    @classmethod
    def create(
        cls,
        dsn: str,
        chain: str,
        *,
        schema: str | None = None,
        pool_size: int = 4,
        pool_timeout: float = POOL_TIMEOUT_S,
    ) -> PostgresChainStore:
        """Create an empty chain in ``schema`` (which must hold no medledger store).

        ``pool_timeout``: how long a call waits for a working connection (e.g.
        while PostgreSQL restarts) before it raises ``RetryableStorageError``.
        """
        schema = schema or cls.default_schema(chain)
        open_schema(dsn, schema, "chain", create=True, meta={"chain": chain})
        pool = open_pool(dsn, schema, max_size=pool_size, name=schema, timeout=pool_timeout)
        return cls(dsn, schema, chain, pool)

    @classmethod
    def open(
        cls,
        dsn: str,
        chain: str | None = None,
        *,
        schema: str | None = None,
        pool_size: int = 4,
        pool_timeout: float = POOL_TIMEOUT_S,
    ) -> PostgresChainStore:
        """Open an existing chain (applying pending migrations); ``chain`` is checked if given."""
        if schema is None:
            if chain is None:
                raise InvalidInput("give the chain id or the schema of the chain store")
            schema = cls.default_schema(chain)
        meta = open_schema(dsn, schema, "chain", create=False)
        stored = meta.get("chain")
        if stored is None or (chain is not None and stored != chain):
            raise StorageError(f"{schema_where(dsn, schema)} holds chain {stored!r}, not {chain!r}")
        pool = open_pool(dsn, schema, max_size=pool_size, name=schema, timeout=pool_timeout)
        return cls(dsn, schema, stored, pool)

    def close(self) -> None:
        self._close_pool()

    # -- writes ------------------------------------------------------------

    def fence(self, epoch: int) -> None:
        """From now on, append only while the sequencer lease is still at ``epoch``.

        The check is a statement of the block's own transaction that share-locks
        the lease row (``storage.postgres.lease``): a takeover's epoch increment
        waits for an append in progress to end, and an append after it is refused
        with :class:`Deposed`. A sequencer that lost its lease but still runs
        therefore cannot append, whatever it believes.
        """
        self._epoch = epoch

    def append_block(self, block: NewBlock) -> None:
        """Write the block in one transaction; return once committed (durable).

        Fenced (:meth:`fence`): raises :class:`Deposed` and writes nothing once
        another process took the sequencer lease.
        """
        height = block.header.height
        first = block.first_index
        sigs = json.dumps([s.to_json() for s in block.signatures], separators=(",", ":"))
        txs = [
            (first + i, hkey(h), d)
            for i, (h, d) in enumerate(zip(block.tx_hashes, block.tx_data, strict=True))
        ]
        nodes = [(node_key(n), h) for n, h in block.nodes]
        with self._write_lock:
            xid: str | None = None
            committing = False
            try:
                with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                    if self._epoch is not None:
                        held = cur.execute(
                            b"SELECT epoch FROM sequencer WHERE id = 1 AND epoch = %s FOR SHARE",
                            (self._epoch,),
                        ).fetchone()
                        if held is None:
                            raise Deposed(
                                f"{self.where}: the sequencer lease of epoch {self._epoch} was"
                                f" taken over; block {height} was not appended"
                            )
                    row = cur.execute(
                        b"SELECT pg_current_xact_id()::text, (SELECT max(height) FROM blocks)"
                    ).fetchone()
                    assert row is not None
                    xid, top = row
                    expected = 0 if top is None else top + 1
                    if height != expected:
                        raise Conflict(f"block height {height} does not follow head {expected - 1}")
                    cur.execute(
                        b"INSERT INTO blocks (height, hash, header, signatures, first_index,"
                        b" tx_count) VALUES (%s, %s, %s, %s, %s, %s)",
                        (height, block.block_hash, block.header_bytes, sigs, first, len(txs)),
                    )
                    if txs:
                        with cur.copy(
                            b"COPY txs (idx, hkey, data) FROM STDIN (FORMAT BINARY)"
                        ) as cp:
                            cp.set_types(["int8", "int8", "bytea"])
                            for r in txs:
                                cp.write_row(r)
                    if nodes:
                        with cur.copy(b"COPY nodes (id, hash) FROM STDIN (FORMAT BINARY)") as cp:
                            cp.set_types(["int8", "bytea"])
                            for n in nodes:
                                cp.write_row(n)
                    committing = True  # leaving the block sends COMMIT
            except psycopg.errors.UniqueViolation as exc:
                raise Conflict(
                    f"{self.where}: block {height} overlaps stored data ({reason(exc)})"
                ) from None
            except psycopg.Error as exc:
                if committing and xid is not None and isinstance(exc, psycopg.OperationalError):
                    self._resolve_in_doubt(xid, height, block.block_hash, exc)
                    return
                raise storage_error(exc, f"{self.where}: block {height}") from None

    def _resolve_in_doubt(self, xid: str, height: int, block_hash: bytes, exc: Exception) -> None:
        """The connection died during COMMIT: return if it committed, else raise retryable."""
        deadline = time.monotonic() + IN_DOUBT_TIMEOUT_S
        while True:
            try:
                with psycopg.connect(self.dsn, **connect_kwargs(self.dsn)) as conn:
                    set_session(conn, self.schema)
                    row = conn.execute(
                        "SELECT pg_xact_status(%s::xid8), (SELECT hash FROM blocks WHERE height = %s)",
                        (xid, height),
                    ).fetchone()
                assert row is not None
                status, stored = row
                if status == "committed" and stored is not None and bytes(stored) == block_hash:
                    return
                if status != "in progress":
                    raise RetryableStorageError(
                        f"{self.where}: block {height} was not committed"
                        f" (connection lost: {reason(exc)}); retry"
                    )
            except psycopg.Error:
                pass
            if time.monotonic() >= deadline:
                raise RetryableStorageError(
                    f"{self.where}: block {height}: connection lost during COMMIT and PostgreSQL"
                    " stayed unreachable; its outcome is unknown until the chain is reopened"
                )
            time.sleep(0.2)

    # -- reads -------------------------------------------------------------

    def _stored(self, row: Sequence[Any]) -> StoredBlock:
        return stored_block(row[:5], row[5])

    def head(self) -> StoredBlock | None:
        rows = self._rows(_BLOCK_SELECT + " ORDER BY b.height DESC LIMIT 1")
        return self._stored(rows[0]) if rows else None

    def head_header_bytes(self) -> bytes | None:
        rows = self._rows("SELECT header FROM blocks ORDER BY height DESC LIMIT 1")
        return bytes(rows[0][0]) if rows else None

    def block(self, height: int) -> StoredBlock:
        rows = (
            self._rows(_BLOCK_SELECT + " WHERE b.height = %s", (height,))
            if 0 <= height < MAX_KEY
            else []
        )
        if not rows:
            raise NotFound(f"no block at height {height}")
        return self._stored(rows[0])

    def block_hash(self, height: int) -> bytes:
        rows = (
            self._rows("SELECT hash FROM blocks WHERE height = %s", (height,))
            if 0 <= height < MAX_KEY
            else []
        )
        if not rows:
            raise NotFound(f"no block at height {height}")
        return bytes(rows[0][0])

    def iter_blocks(self, start: int = 0, end: int | None = None) -> Iterator[StoredBlock]:
        """Blocks in pages of 256; bounded by the head seen when iteration starts."""
        start = max(start, 0)
        top = self._rows("SELECT max(height) FROM blocks")[0][0]
        stop = -1 if top is None else top + 1
        if end is not None:
            stop = min(stop, end)
        while start < stop:
            rows = self._rows(
                _BLOCK_SELECT
                + " WHERE b.height >= %s AND b.height < %s ORDER BY b.height LIMIT 256",
                (start, stop),
            )
            if not rows:
                return
            for row in rows:
                yield self._stored(row)
            start = int(rows[-1][0]) + 1

    def node_hashes(self, ids: Sequence[NodeID]) -> dict[NodeID, bytes]:
        leaves = sorted({n.index for n in ids if n.level == 0 and n.index < MAX_KEY})
        keys = sorted({node_key(n) for n in ids if n.level > 0 and node_key(n) < MAX_KEY})
        with self._conn() as conn:
            data = (
                dict(
                    conn.execute(
                        b"SELECT idx, data FROM txs WHERE idx = ANY(%s::int8[])", (leaves,)
                    ).fetchall()
                )
                if leaves
                else {}
            )
            hashes = (
                dict(
                    conn.execute(
                        b"SELECT id, hash FROM nodes WHERE id = ANY(%s::int8[])", (keys,)
                    ).fetchall()
                )
                if keys
                else {}
            )
        out: dict[NodeID, bytes] = {}
        for node in ids:
            if node in out:
                continue
            if node.level == 0:
                found = data.get(node.index)
                if found is not None:
                    out[node] = leaf_hash(bytes(found))
                    continue
            else:
                found = hashes.get(node_key(node))
                if found is not None:
                    out[node] = bytes(found)
                    continue
            raise NotFound(f"merkle node level {node.level} index {node.index} not stored")
        return out

    def iter_nodes(self) -> Iterator[tuple[NodeID, bytes]]:
        """Nodes in key (= creation) order, in pages; bounded by the last node at start."""
        top = self._rows("SELECT max(id) FROM nodes")[0][0]
        if top is None:
            return
        after = -1
        while after < top:
            rows = self._rows(
                "SELECT id, hash FROM nodes WHERE id > %s AND id <= %s ORDER BY id LIMIT 8192",
                (after, top),
            )
            if not rows:
                return
            for key, h in rows:
                yield node_from_key(int(key)), bytes(h)
            after = int(rows[-1][0])

    def tx_by_hash(self, tx_hash: bytes) -> tuple[int, bytes]:
        for idx, data in self._rows("SELECT idx, data FROM txs WHERE hkey = %s", (hkey(tx_hash),)):
            if sha256(bytes(data)) == tx_hash:
                return int(idx), bytes(data)
        raise NotFound(f"no transaction {tx_hash.hex()}")

    def tx_location(self, tx_hash: bytes) -> tuple[int, int]:
        rows = self._rows(
            "SELECT t.idx, t.data, (SELECT b.height FROM blocks b WHERE b.first_index <= t.idx"
            " AND b.first_index + b.tx_count > t.idx ORDER BY b.first_index DESC LIMIT 1)"
            " FROM txs t WHERE t.hkey = %s",
            (hkey(tx_hash),),
        )
        for idx, data, height in rows:
            if sha256(bytes(data)) == tx_hash:
                if height is None:
                    raise NotFound(f"no block holds transaction {tx_hash.hex()}")
                return int(height), int(idx)
        raise NotFound(f"no transaction {tx_hash.hex()}")

    def tx_data(self, index: int) -> bytes:
        rows = (
            self._rows("SELECT data FROM txs WHERE idx = %s", (index,))
            if 0 <= index < MAX_KEY
            else []
        )
        if not rows:
            raise NotFound(f"no transaction at log index {index}")
        return bytes(rows[0][0])

    def damage(self) -> str | None:
        """``None``: PostgreSQL reports corruption as errors of the failing statement."""
        return None

    def check_storage(self) -> None:
        """PostgreSQL keeps its own pages consistent; a failing read here raises ``StorageError``."""
        self._rows("SELECT height FROM blocks ORDER BY height DESC LIMIT 1")

    def counts(self) -> tuple[int, int, int]:
        b, t, n = self._rows(
            "SELECT (SELECT count(*) FROM blocks), (SELECT count(*) FROM txs),"
            " (SELECT count(*) FROM nodes)"
        )[0]
        return int(b), int(t), int(n)
