"""SQLite connections, transactions and error mapping shared by every SQLite store."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medledger.core.errors import StorageError, StorageFull

__all__ = [
    "DAMAGE_CODES",
    "SqliteFileStore",
    "connect_wal",
    "immediate",
    "sqlite_uri",
    "storage_error",
]


def sqlite_uri(path: Path, mode: str) -> str:
    """A ``file:`` URI for ``path`` (percent-encoded: '#', '?' and '%' are legal in names)."""
    return f"{path.absolute().as_uri()}?mode={mode}"


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` on an autocommit connection; rolled back on any error.

    IMMEDIATE takes the write lock at the start, so a writer never fails
    half-way through with SQLITE_BUSY on lock upgrade.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def connect_wal(path: Path) -> sqlite3.Connection:
    """A writer connection (creating the file): WAL, ``synchronous=FULL``, foreign keys on."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


#: SQLITE_CORRUPT and SQLITE_NOTADB (primary codes; extended codes keep them in the low byte).
DAMAGE_CODES = frozenset({11, 26})


def storage_error(path: Path, exc: sqlite3.Error) -> StorageError:
    """The storage error for a SQLite error: :class:`StorageFull` when the disk is full."""
    if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return StorageFull(f"{path}: {exc} (no space left; nothing was stored)")
    return StorageError(f"{path}: {exc}")


class SqliteFileStore:
    """A small store in one SQLite file, on one autocommit connection (WAL,
    ``synchronous=FULL``: each change durable on return), ``schema`` created if missing:
    the statement primitives that tables written once for every backend
    (``storage.tokens.TokenTable``, ``storage.oauth.OAuthTables``) run on.
    """

    def __init__(self, path: Path, schema: str) -> None:
        self.path = path
        try:
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(schema)
        except sqlite3.Error as exc:
            raise StorageError(f"{path}: {exc}") from None

    def _select(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise storage_error(self.path, exc) from None

    def _execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        try:
            return self._conn.execute(sql, args).rowcount
        except sqlite3.Error as exc:
            raise storage_error(self.path, exc) from None

    def close(self) -> None:
        self._conn.close()
