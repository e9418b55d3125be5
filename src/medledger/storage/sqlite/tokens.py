"""SQLite adapter of :class:`~medledger.storage.ports.TokenStore`: ``tokens.db`` of a SQLite node.

Issuing and checking are written once for every backend
(:class:`~medledger.storage.tokens.TokenTable`); this module keeps the file,
and remembers which presented tokens it verified (:meth:`SqliteTokenStore.check`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medledger.core.errors import InvalidInput
from medledger.storage.dialect import SQLITE
from medledger.storage.ports import TokenInfo
from medledger.storage.sqlite.connection import SqliteFileStore
from medledger.storage.tokens import TokenTable

__all__ = ["MAX_VERIFIED", "SqliteTokenStore"]

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

#: Verified tokens remembered at most (then forgotten all at once): far more than the
#: clients one node serves at a time.
MAX_VERIFIED = 1024


class SqliteTokenStore(SqliteFileStore, TokenTable):
    """Tokens in one SQLite file (WAL, ``synchronous=FULL``: each change durable on return)."""

    dialect = SQLITE

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA)
        # SHA-256 of a presented token's exact text -> what the full check found for it.
        self._verified: dict[bytes, TokenInfo] = {}
        # The file's ``PRAGMA data_version`` when those entries were verified.
        self._verified_in: int | None = None
        # Writes begun on this connection: a check that overlapped one (another thread)
        # does not remember what it read.
        self._writes = 0

    def check(self, token: str, *, now_ms: int) -> TokenInfo:
        """The info of a valid token; ``InvalidInput`` for malformed, unknown, expired or revoked.

        Every request presents its token, and the full check (a row read and a
        hash comparison) costs a read a tenth of its CPU. So a token that passed
        it is remembered, keyed by SHA-256 of its exact text (the bearer secret
        itself is not kept), and the next check of the same text skips the row
        read. What is still checked on every call:

        * revocation, and any other change to the file: ``PRAGMA data_version``
          differs as soon as any other connection (``medledger token revoke``,
          another API worker) committed to it, and every write on this
          connection clears the memory first; either way nothing remembered is
          used, the token is checked in full again;
        * expiry, against ``now_ms``, with the full check's answer;
        * the failed-authentication budget: a token that fails is never
          remembered, so every failure takes the full check and reaches the
          caller's charge (``api.auth``) as before.
        """
        version = self._data_version()
        if version != self._verified_in:
            self._verified.clear()
            self._verified_in = version
        key = hashlib.sha256(token.encode()).digest()
        info = self._verified.get(key)
        if info is None:
            writes = self._writes
            info = super().check(token, now_ms=now_ms)
            if writes == self._writes:
                if len(self._verified) >= MAX_VERIFIED:
                    self._verified.clear()
                self._verified[key] = info
        elif info.expires_ms is not None and now_ms >= info.expires_ms:
            raise InvalidInput("token expired")
        return info

    def _data_version(self) -> int:
        row = self._select("PRAGMA data_version")[0]
        return int(row[0])

    def _execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        # Before the write, so no check between the commit and the return can use
        # what the write changed (another connection's writes: ``data_version``).
        self._writes += 1
        self._verified.clear()
        try:
            return super()._execute(sql, args)
        finally:
            self._writes += 1
            self._verified.clear()
