"""SQLite adapter of :class:`~medledger.storage.ports.RecordIndex`: versions, wrapped data keys, tokens.

Holds no plaintext: per version the blob hash, the data key wrapped by the
institution KEK (``NULL`` once crypto-shredded), the patient pseudonym, the
chain transaction hash, and the HMAC tokens search uses. Writes are group
committed (``synchronous=FULL``): a ``put_version`` that returned is durable.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medledger.core.errors import Conflict, NotFound, StorageError
from medledger.storage.batching import GroupCommitter
from medledger.storage.dialect import SQLITE
from medledger.storage.ports import RECOVERY_MARK, VersionRow
from medledger.storage.record_sql import (
    RecordQueries,
    RecordReads,
    RecordWrites,
    version_params,
    version_row,
)
from medledger.storage.sqlite.checkpoint import WalCheckpointer
from medledger.storage.sqlite.connection import immediate, sqlite_uri, storage_error
from medledger.storage.sqlite.schema import (
    RECORDS_CHAIN_BASE,
    RECORDS_DELETED,
    RECORDS_PENDING_TOKENS,
    RECORDS_SCHEMA,
    RECORDS_SCHEMA_VERSION,
)

__all__ = ["SqliteRecordIndex"]

_QUERIES = RecordQueries.for_dialect(SQLITE)


def _create_tables(conn: sqlite3.Connection) -> None:
    """Every table of the current schema, and its version, in a new index file."""
    conn.executescript(
        "BEGIN;"
        + RECORDS_SCHEMA
        + RECORDS_CHAIN_BASE
        + RECORDS_DELETED
        + RECORDS_PENDING_TOKENS
        + "COMMIT;"
    )
    conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(RECORDS_SCHEMA_VERSION),))


class SqliteRecordIndex(RecordReads, RecordWrites):
    """:class:`~medledger.storage.ports.RecordIndex` in one SQLite file (WAL, ``synchronous=FULL``).

    Statements and reads: :mod:`medledger.storage.record_sql`, shared with PostgreSQL.
    """

    @classmethod
    def initialize(cls, path: Path) -> None:
        """Create an empty index at ``path`` (synchronously, for node creation)."""
        try:
            conn = sqlite3.connect(path, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                _create_tables(conn)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot create record index {path} ({exc})") from None

    def __init__(self, path: Path) -> None:
        self.path = path
        new = not path.exists()
        try:
            self._writer = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=30
            )
            self._writer.execute("PRAGMA journal_mode=WAL")
            self._writer.execute("PRAGMA synchronous=FULL")
            # Checkpoints run on a thread of their own, not inside a write's commit.
            WalCheckpointer.configure_writer(self._writer)
            # Erased keys and tokens are overwritten, not left in free pages.
            self._writer.execute("PRAGMA secure_delete=ON")
            if new:
                _create_tables(self._writer)
            version = self._writer.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'"
            ).fetchone()
            if version is not None and version[0] == str(RECORDS_SCHEMA_VERSION):
                columns = {r[1] for r in self._writer.execute("PRAGMA table_info(versions)")}
                if "chain_base" not in columns:
                    self._writer.executescript("BEGIN;" + RECORDS_CHAIN_BASE + "COMMIT;")
                if "deleted" not in columns:
                    self._writer.executescript("BEGIN;" + RECORDS_DELETED + "COMMIT;")
                if not self._writer.execute(
                    "SELECT 1 FROM sqlite_master WHERE name = 'pending_tokens'"
                ).fetchone():
                    self._writer.executescript("BEGIN;" + RECORDS_PENDING_TOKENS + "COMMIT;")
        except sqlite3.Error as exc:
            raise StorageError(f"{path} is not a readable record index ({exc})") from None
        if version is None or version[0] != str(RECORDS_SCHEMA_VERSION):
            raise StorageError(f"{path}: unsupported record index schema")
        self._queries = _QUERIES
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._checkpoints = WalCheckpointer(path)
        self._writes: GroupCommitter[tuple[str, Any]] = GroupCommitter(
            self._apply, name="medledger-index"
        )

    # -- writes (one transaction per batch) ------------------------------------

    def _apply(self, ops: Sequence[tuple[str, Any]]) -> list[BaseException | None]:
        conn = self._writer
        results: list[BaseException | None] = []
        try:
            with immediate(conn):
                for kind, arg in ops:
                    try:
                        results.append(self._one(conn, kind, arg))
                    except sqlite3.IntegrityError:
                        results.append(
                            Conflict(
                                f"{arg[0].resource_type}/{arg[0].id} version "
                                f"{arg[0].version} already exists"
                            )
                        )
        except sqlite3.Error as exc:
            err = storage_error(self.path, exc)
            return [err] * len(ops)
        self._checkpoints.committed()
        return results

    @staticmethod
    def _one(conn: sqlite3.Connection, kind: str, arg: Any) -> None:
        q = _QUERIES
        if kind == "put":
            row, tokens = arg
            conn.execute(q.insert_version, version_params(row))
            if tokens is None:  # its tokens follow ("settle")
                conn.execute(q.insert_pending, (row.resource_type, row.id, row.version))
                return None
            conn.execute(q.delete_tokens, (row.resource_type, row.id))
            conn.executemany(q.insert_token, [(t, row.resource_type, row.id) for t in tokens])
        elif kind == "settle":
            row, tokens = arg
            key = (row.resource_type, row.id, row.version)
            current = conn.execute(q.settle_check, (*key, *key)).fetchone() is not None
            conn.execute(q.delete_pending, key)
            if current:
                conn.execute(q.delete_tokens, (row.resource_type, row.id))
                conn.executemany(q.insert_token, [(t, row.resource_type, row.id) for t in tokens])
        elif kind == "remove":
            conn.execute(q.delete_version, arg)
            conn.execute(q.delete_pending, arg)
        elif kind == "tokens":
            rtype, rid, tokens = arg
            conn.execute(q.delete_tokens, (rtype, rid))
            conn.executemany(q.insert_token, [(t, rtype, rid) for t in tokens])
        elif kind == "mark":
            conn.execute(q.set_meta, (RECOVERY_MARK, str(arg)))
        elif kind == "meta":
            key, value = arg
            if value is None:
                conn.execute(q.delete_meta, (key,))
            else:
                conn.execute(q.set_meta, (key, value))
        else:
            raise StorageError(f"unknown index operation {kind}")

    async def erase(self, resource_type: str, rid: str) -> list[bytes]:
        """Destroy every wrapped data key and token of a resource; return its blob hashes."""

        def run() -> list[bytes]:
            conn = self._writer
            with immediate(conn):
                rows = conn.execute(_QUERIES.erase_select, (resource_type, rid)).fetchall()
                if not rows:
                    raise NotFound(f"{resource_type}/{rid} does not exist")
                conn.execute(_QUERIES.erase_update, (resource_type, rid))
                conn.execute(_QUERIES.delete_tokens, (resource_type, rid))
                conn.execute(_QUERIES.delete_pending_of, (resource_type, rid))
            # Overwritten pages of the old keys must not linger in the WAL or free pages
            # (under the lock: SQLite skips a checkpoint while another one runs).
            with self._checkpoints.lock:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return [bytes(r[0]) for r in rows]

        result: list[bytes] = await self._exclusive(run)
        return result

    async def rewrap(
        self, old_kek_id: str, new_kek_id: str, fn: Callable[[VersionRow], bytes]
    ) -> int:
        """Re-wrap every data key wrapped by ``old_kek_id`` (``fn`` gives the new wrapping)."""

        def run() -> int:
            conn = self._writer
            done = 0
            while True:
                rows = [version_row(r) for r in conn.execute(_QUERIES.rewrap_select, (old_kek_id,))]
                if not rows:
                    break
                updates = [(fn(r), new_kek_id, r.resource_type, r.id, r.version) for r in rows]
                with immediate(conn):
                    conn.executemany(_QUERIES.rewrap_update, updates)
                done += len(rows)
            with self._checkpoints.lock:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return done

        count: int = await self._exclusive(run)
        return count

    async def _exclusive(self, fn: Callable[[], Any]) -> Any:
        try:
            return await self._writes.run_exclusive(fn)
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: {exc}") from None

    # -- reads -------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                sqlite_uri(self.path, "ro"),
                uri=True,
                isolation_level=None,
                check_same_thread=False,
                timeout=30,
            )
            self._local.conn = conn
            with self._lock:
                self._readers.append(conn)
        return conn

    def _select(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._reader().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: {exc}") from None

    async def close(self) -> None:
        await self._writes.close()
        self._checkpoints.close()
        with self._lock:
            for conn in self._readers:
                conn.close()
        self._writer.close()
        self._checkpoints.release()  # after the last connection: it drops the file's locks
