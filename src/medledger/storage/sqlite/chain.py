"""SQLite adapter of :class:`~medledger.storage.ports.ChainStore`: the embedded default.

WAL journal with ``synchronous=FULL``: a committed block is on disk (one WAL
fsync per block) before ``append_block`` returns. One writer connection,
used by the sequencer's single commit thread; readers get their own
connection per thread and never block the writer (WAL snapshot isolation).
Keys of Merkle nodes and transactions: :mod:`medledger.storage.chain_layout`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from medledger.core.errors import (
    Conflict,
    DamagedStore,
    NotFound,
    StorageError,
)
from medledger.core.hashing import sha256
from medledger.core.merkle import NodeID, leaf_hash
from medledger.storage.chain_layout import hkey, node_from_key, node_key, stored_block
from medledger.storage.ports import NewBlock, StoredBlock
from medledger.storage.sqlite.checkpoint import WalCheckpointer
from medledger.storage.sqlite.connection import (
    DAMAGE_CODES,
    connect_wal,
    immediate,
    sqlite_uri,
    storage_error,
)
from medledger.storage.sqlite.schema import CHAIN_SCHEMA, CHAIN_SCHEMA_VERSION

__all__ = ["SqliteChainStore"]


class SqliteChainStore:
    """A chain in one SQLite file. Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, path: Path, chain: str, writer: sqlite3.Connection) -> None:
        self.path = path
        self.chain = chain
        self._writer = writer
        self._write_lock = threading.Lock()
        # Checkpoints run on a thread of their own (started by the first append), not
        # inside a block's commit.
        self._checkpoints = WalCheckpointer(path)
        try:
            WalCheckpointer.configure_writer(writer)
        except sqlite3.Error as exc:
            writer.close()
            raise storage_error(path, exc) from None
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._damage: str | None = None

    def _failed(self, exc: sqlite3.Error) -> StorageError:
        """The error to raise for ``exc``; a corrupt file is remembered (see :meth:`damage`)."""
        error = storage_error(self.path, exc)
        code = getattr(exc, "sqlite_errorcode", None)
        if isinstance(code, int) and code & 0xFF in DAMAGE_CODES:
            self._damage = str(error)
        return error

    def damage(self) -> str | None:
        """Why this store can no longer be trusted (SQLite read a corrupt page), or ``None``."""
        return self._damage

    # -- lifecycle ---------------------------------------------------------

    @classmethod
    def create(cls, path: Path, chain: str) -> SqliteChainStore:
        """Create a new, empty chain database at ``path`` (which must not exist)."""
        if path.exists():
            raise Conflict(f"{path} already exists")
        try:
            conn = connect_wal(path)
            conn.executescript("BEGIN;" + CHAIN_SCHEMA + "COMMIT;")
            conn.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?)",
                [("schema_version", str(CHAIN_SCHEMA_VERSION)), ("chain", chain)],
            )
        except sqlite3.Error as exc:
            raise storage_error(path, exc) from None
        return cls(path, chain, conn)

    @classmethod
    def open(cls, path: Path) -> SqliteChainStore:
        """Open an existing chain database; never creates or alters one."""
        if not path.is_file():
            raise NotFound(f"no chain database at {path}")
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(
                sqlite_uri(path, "rw"),
                uri=True,
                isolation_level=None,
                check_same_thread=False,
                timeout=30,
            )
            rows = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.Error as exc:
            # Closed now, not when the error is dropped: an open connection keeps the
            # -wal/-shm files SQLite created beside a file it could not read.
            if conn is not None:
                conn.close()
            raise StorageError(
                f"{path} is not a readable medledger chain database ({exc})"
            ) from None
        # Check what the file is before any PRAGMA that could change it.
        if rows.get("schema_version") != str(CHAIN_SCHEMA_VERSION) or "chain" not in rows:
            conn.close()
            raise StorageError(
                f"{path}: not a medledger chain database of schema version {CHAIN_SCHEMA_VERSION}"
                f" (found {rows.get('schema_version')!r})"
            )
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            conn.close()
            raise StorageError(f"{path}: {exc}") from None
        return cls(path, rows["chain"], conn)

    def close(self) -> None:
        self._checkpoints.close()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        self._writer.close()
        self._checkpoints.release()  # after the last connection: it drops the file's locks

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(
                    sqlite_uri(self.path, "rw"),
                    uri=True,
                    isolation_level=None,
                    check_same_thread=False,
                    timeout=30,
                )
            except sqlite3.Error as exc:
                raise self._failed(exc) from None
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._reader().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise self._failed(exc) from None

    # -- writes ------------------------------------------------------------

    def append_block(self, block: NewBlock) -> None:
        height = block.header.height
        first = block.first_index
        sigs = json.dumps([s.to_json() for s in block.signatures], separators=(",", ":"))
        with self._write_lock:
            conn = self._writer
            try:
                with immediate(conn):
                    row = conn.execute("SELECT MAX(height) FROM blocks").fetchone()
                    expected = 0 if row[0] is None else row[0] + 1
                    if height != expected:
                        raise Conflict(f"block height {height} does not follow head {expected - 1}")
                    conn.execute(
                        "INSERT INTO blocks(height, hash, header, signatures, first_index, tx_count)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            height,
                            block.block_hash,
                            block.header_bytes,
                            sigs,
                            first,
                            len(block.tx_data),
                        ),
                    )
                    conn.executemany(
                        "INSERT INTO txs(idx, hkey, data) VALUES (?, ?, ?)",
                        [
                            (first + i, hkey(h), d)
                            for i, (h, d) in enumerate(
                                zip(block.tx_hashes, block.tx_data, strict=True)
                            )
                        ],
                    )
                    conn.executemany(
                        "INSERT INTO nodes(id, hash) VALUES (?, ?)",
                        [(node_key(n), h) for n, h in block.nodes],
                    )
            except sqlite3.Error as exc:
                raise self._failed(exc) from None
            self._checkpoints.committed()

    # -- reads -------------------------------------------------------------

    def _stored(self, row: Any, txs: tuple[bytes, ...]) -> StoredBlock:
        return stored_block(row, txs)

    _BLOCK_COLS = "height, hash, header, signatures, first_index"

    def head(self) -> StoredBlock | None:
        rows = self._query(
            f"SELECT {self._BLOCK_COLS}, tx_count FROM blocks ORDER BY height DESC LIMIT 1"
        )
        if not rows:
            return None
        return self._with_txs(rows[0])

    def head_header_bytes(self) -> bytes | None:
        rows = self._query("SELECT header FROM blocks ORDER BY height DESC LIMIT 1")
        return bytes(rows[0][0]) if rows else None

    def _with_txs(self, row: Any) -> StoredBlock:
        first, count = row[4], row[5]
        txs = self._query(
            "SELECT data FROM txs WHERE idx >= ? AND idx < ? ORDER BY idx", (first, first + count)
        )
        return self._stored(row[:5], tuple(bytes(t[0]) for t in txs))

    def block(self, height: int) -> StoredBlock:
        rows = self._query(
            f"SELECT {self._BLOCK_COLS}, tx_count FROM blocks WHERE height = ?", (height,)
        )
        if not rows:
            raise NotFound(f"no block at height {height}")
        return self._with_txs(rows[0])

    def block_hash(self, height: int) -> bytes:
        rows = self._query("SELECT hash FROM blocks WHERE height = ?", (height,))
        if not rows:
            raise NotFound(f"no block at height {height}")
        return bytes(rows[0][0])

    def iter_blocks(self, start: int = 0, end: int | None = None) -> Iterator[StoredBlock]:
        stop = end if end is not None else 2**62
        try:
            conn = self._reader()
            blocks = conn.execute(
                f"SELECT {self._BLOCK_COLS}, tx_count FROM blocks"
                " WHERE height >= ? AND height < ? ORDER BY height",
                (start, stop),
            )
            first_row = None
            pending: list[Any] = []
            # Stream transactions alongside blocks with a second cursor.
            txs_cur: sqlite3.Cursor | None = None
            carry: tuple[int, bytes] | None = None
            while True:
                batch = blocks.fetchmany(256)
                if not batch:
                    break
                for row in batch:
                    if first_row is None:
                        first_row = row
                        txs_cur = conn.execute(
                            "SELECT idx, data FROM txs WHERE idx >= ? ORDER BY idx", (row[4],)
                        )
                    assert txs_cur is not None
                    lo, hi = row[4], row[4] + row[5]
                    pending.clear()
                    while True:
                        if carry is None:
                            nxt = txs_cur.fetchone()
                            if nxt is None:
                                break
                            carry = (nxt[0], bytes(nxt[1]))
                        if carry[0] < lo:
                            carry = None
                            continue
                        if carry[0] >= hi:
                            break
                        pending.append(carry[1])
                        carry = None
                    yield self._stored(row[:5], tuple(pending))
        except sqlite3.Error as exc:
            raise self._failed(exc) from None

    def node_hashes(self, ids: Sequence[NodeID]) -> dict[NodeID, bytes]:
        # One primary-key lookup per node: an IN (...) list made SQLite scan.
        out: dict[NodeID, bytes] = {}
        try:
            cur = self._reader()
            for node in ids:
                if node in out:
                    continue
                if node.level == 0:
                    row = cur.execute(
                        "SELECT data FROM txs WHERE idx = ?", (node.index,)
                    ).fetchone()
                    if row is not None:
                        out[node] = leaf_hash(bytes(row[0]))
                        continue
                else:
                    row = cur.execute(
                        "SELECT hash FROM nodes WHERE id = ?", (node_key(node),)
                    ).fetchone()
                    if row is not None:
                        out[node] = bytes(row[0])
                        continue
                raise NotFound(f"merkle node level {node.level} index {node.index} not stored")
        except sqlite3.Error as exc:
            raise self._failed(exc) from None
        return out

    def iter_nodes(self) -> Iterator[tuple[NodeID, bytes]]:
        try:
            cur = self._reader().execute("SELECT id, hash FROM nodes ORDER BY id")
            while True:
                batch = cur.fetchmany(4096)
                if not batch:
                    return
                for key, h in batch:
                    yield node_from_key(key), bytes(h)
        except sqlite3.Error as exc:
            raise self._failed(exc) from None

    def tx_by_hash(self, tx_hash: bytes) -> tuple[int, bytes]:
        for idx, data in self._query("SELECT idx, data FROM txs WHERE hkey = ?", (hkey(tx_hash),)):
            if sha256(bytes(data)) == tx_hash:
                return int(idx), bytes(data)
        raise NotFound(f"no transaction {tx_hash.hex()}")

    def tx_location(self, tx_hash: bytes) -> tuple[int, int]:
        idx, _ = self.tx_by_hash(tx_hash)
        rows = self._query(
            "SELECT height FROM blocks WHERE first_index <= ? ORDER BY first_index DESC LIMIT 1",
            (idx,),
        )
        if not rows:
            raise NotFound(f"no block holds transaction {tx_hash.hex()}")
        return int(rows[0][0]), idx

    def tx_data(self, index: int) -> bytes:
        rows = self._query("SELECT data FROM txs WHERE idx = ?", (index,))
        if not rows:
            raise NotFound(f"no transaction at log index {index}")
        return bytes(rows[0][0])

    def check_storage(self) -> None:
        """``PRAGMA quick_check``: page, record and index structure (O(database size))."""
        try:
            rows = self._reader().execute("PRAGMA quick_check").fetchall()
        except sqlite3.DatabaseError as exc:
            self._damage = f"{self.path}: {exc}"
            raise DamagedStore(self._damage) from None
        problems = [str(r[0]) for r in rows if r[0] != "ok"]
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            self._damage = f"{self.path}: {problems[0]}{more}"
            raise DamagedStore(self._damage)

    def counts(self) -> tuple[int, int, int]:
        rows = self._query(
            "SELECT (SELECT COUNT(*) FROM blocks), (SELECT COUNT(*) FROM txs),"
            " (SELECT COUNT(*) FROM nodes)"
        )
        b, t, n = rows[0]
        return int(b), int(t), int(n)
