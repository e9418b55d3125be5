"""PostgreSQL adapter of :class:`~medledger.storage.ports.OAuthStore`: a PostgreSQL node's
authorization-server state, in its own schema (created on first open).

The statements are shared with SQLite (:class:`~medledger.storage.oauth.OAuthTables`);
each change is one autocommit statement (``synchronous_commit`` on): durable when it returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from medledger.core.errors import Conflict
from medledger.storage.dialect import POSTGRES
from medledger.storage.oauth import OAuthTables
from medledger.storage.postgres.connection import PooledStore, open_pool
from medledger.storage.postgres.migrations import open_or_create_schema, open_schema

__all__ = ["PostgresOAuthStore"]


class PostgresOAuthStore(PooledStore, OAuthTables):
    """The authorization server's tables in one PostgreSQL schema."""

    dialect = POSTGRES

    @classmethod
    def initialize(cls, dsn: str, *, schema: str) -> None:
        """Create an empty store in ``schema`` (which must hold no medledger store).

        A new node creates it with its other stores, so a schema left by an
        earlier node of the same name is refused instead of inherited (its
        clients and grants would otherwise sign users in to the new node).
        """
        open_schema(dsn, schema, "oauth", create=True)

    def __init__(self, dsn: str, *, schema: str, pool_size: int = 2) -> None:
        open_or_create_schema(dsn, schema, "oauth")
        super().__init__(dsn, schema, open_pool(dsn, schema, max_size=pool_size, name=schema))

    def _select(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return self._rows(sql, args)

    def _execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        with self._conn() as conn:
            return conn.execute(sql.encode(), args).rowcount

    def _insert(self, sql: str, args: Sequence[Any]) -> bool:
        try:
            with self._conn() as conn:
                conn.execute(sql.encode(), args)
        except Conflict:  # a unique key (``PooledStore`` maps the violation)
            return False
        return True

    def close(self) -> None:
        self._close_pool()
