"""SQLite adapter of :class:`~medledger.storage.ports.TokenStore`: ``tokens.db`` of a SQLite node.

Issuing and checking are written once for every backend
(:class:`~medledger.storage.tokens.TokenTable`); this module keeps the file.
"""

from __future__ import annotations

from pathlib import Path

from medledger.storage.dialect import SQLITE
from medledger.storage.sqlite.connection import SqliteFileStore
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


class SqliteTokenStore(SqliteFileStore, TokenTable):
    """Tokens in one SQLite file (WAL, ``synchronous=FULL``: each change durable on return)."""

    dialect = SQLITE

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA)
