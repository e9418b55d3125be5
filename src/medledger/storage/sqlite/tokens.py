"""SQLite adapter of :class:`~medledger.storage.ports.TokenStore`: ``tokens.db`` of a SQLite node.

Issuing and checking are written once for every backend
(:class:`~medledger.storage.tokens.TokenTable`); this module keeps the file.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medledger.core.errors import StorageError
from medledger.storage.dialect import SQLITE
from medledger.storage.sqlite.connection import storage_error
from medledger.storage.tokens import TokenTable

__all__ = ["SqliteTokenStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    secret_hash BLOB NOT NULL,
    role TEXT NOT NULL,
    patient TEXT,
    label TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER,
    revoked INTEGER NOT NULL DEFAULT 0
);
"""


class SqliteTokenStore(TokenTable):
    """Tokens in one SQLite file (WAL, ``synchronous=FULL``: each change durable on return)."""

    dialect = SQLITE

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
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
