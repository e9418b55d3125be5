"""SQLite adapter of :class:`~medledger.storage.ports.OAuthStore`: ``oauth.db`` of a SQLite node.

The statements are shared with PostgreSQL (:class:`~medledger.storage.oauth.OAuthTables`);
this module keeps the file (WAL, ``synchronous=FULL``: each change durable on return).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medledger.core.errors import StorageError
from medledger.storage.dialect import SQLITE
from medledger.storage.oauth import OAUTH_SCHEMA, OAUTH_TOKEN_SCOPE, OAuthTables
from medledger.storage.sqlite.connection import SqliteFileStore, storage_error

__all__ = ["SqliteOAuthStore"]


class SqliteOAuthStore(SqliteFileStore, OAuthTables):
    """The authorization server's state in one SQLite file (created on first open, mode 0600)."""

    dialect = SQLITE

    def __init__(self, path: Path) -> None:
        try:
            # Codes and token hashes: readable by the node's user only.
            path.touch(mode=0o600, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"{path}: {exc}") from None
        super().__init__(path, OAUTH_SCHEMA)
        try:
            self._add_token_scope()
        except sqlite3.Error as exc:
            raise StorageError(f"{path}: {exc}") from None

    def _add_token_scope(self) -> None:
        """Give a file made before tokens had their own scope that column (once: the check
        and the change in one write transaction, as a node's processes open it together)."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            columns = {row[1] for row in self._conn.execute("PRAGMA table_info(oauth_tokens)")}
            if "scope" not in columns:
                self._conn.execute(OAUTH_TOKEN_SCOPE)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _insert(self, sql: str, args: Sequence[Any]) -> bool:
        try:
            self._conn.execute(sql, args)
        except sqlite3.IntegrityError:
            return False
        except sqlite3.Error as exc:
            raise storage_error(self.path, exc) from None
        return True
