"""PostgreSQL adapter of :class:`~medledger.storage.ports.TokenStore`: a PostgreSQL node's API tokens.

Issuing and checking are written once for every backend
(:class:`~medledger.storage.tokens.TokenTable`). Each change is one autocommit
statement (``synchronous_commit`` on): durable when it returns.

A node created before its tokens lived in PostgreSQL kept them in
``tokens.db``; :meth:`PostgresTokenStore.import_legacy` moves them here once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medledger.core.errors import StorageError
from medledger.storage.dialect import POSTGRES
from medledger.storage.postgres.connection import PooledStore, open_pool
from medledger.storage.postgres.migrations import open_or_create_schema, open_schema
from medledger.storage.sqlite.connection import sqlite_uri
from medledger.storage.tokens import COLUMNS, TokenTable

__all__ = ["PostgresTokenStore"]


class PostgresTokenStore(PooledStore, TokenTable):
    """Tokens in one PostgreSQL schema (created on first open)."""

    dialect = POSTGRES

    @classmethod
    def initialize(cls, dsn: str, *, schema: str) -> None:
        """Create an empty store in ``schema`` (which must hold no medledger store).

        A new node creates it with its other stores, so a schema left by an
        earlier node of the same name is refused instead of inherited.
        """
        open_schema(dsn, schema, "tokens", create=True)

    def __init__(self, dsn: str, *, schema: str, pool_size: int = 2) -> None:
        open_or_create_schema(dsn, schema, "tokens")
        super().__init__(dsn, schema, open_pool(dsn, schema, max_size=pool_size, name=schema))

    def _select(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return self._rows(sql, args)

    def _execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        with self._conn() as conn:
            return conn.execute(sql.encode(), args).rowcount

    def import_legacy(self, path: Path) -> int:
        """Move every token of the SQLite file ``path`` here, then rename it ``*.imported``.

        Idempotent and crash-safe: rows are inserted in one transaction (a
        token already here is kept as it is), and the file is renamed only
        after that committed — a crash in between imports again on the next
        open. Returns how many tokens were new here.
        """
        if not path.exists():
            return 0
        try:
            conn = sqlite3.connect(sqlite_uri(path, "rw"), uri=True)
            try:
                rows = conn.execute(f"SELECT {COLUMNS} FROM tokens").fetchall()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StorageError(
                f"cannot import API tokens from {path} ({exc}); the file is left as it is"
            ) from None
        added = 0
        with self._conn() as pg, pg.transaction(), pg.cursor() as cur:
            for r in rows:
                cur.execute(
                    f"INSERT INTO tokens ({COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (id) DO NOTHING".encode(),
                    (r[0], bytes(r[1]), r[2], r[3], r[4], int(r[5]), r[6], bool(r[7])),
                )
                added += cur.rowcount
        path.replace(path.with_name(path.name + ".imported"))
        return added

    def close(self) -> None:
        self._close_pool()
