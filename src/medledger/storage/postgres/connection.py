"""What every PostgreSQL store shares: DSNs, connection pools, sessions, error mapping.

The adapters (psycopg 3, one connection pool per store):

* :class:`~medledger.storage.postgres.chain.PostgresChainStore` — :class:`~medledger.storage.ports.ChainStore`,
  the same tables and keys as the SQLite adapter (``node_key`` for Merkle
  nodes, an 8-byte ``hkey`` index for ``tx_by_hash``, level-0 nodes derived
  from transaction data).
* :class:`~medledger.storage.postgres.records.PostgresRecordIndex` — :class:`~medledger.storage.ports.RecordIndex`,
  group-committed like the SQLite index (one transaction per batch).
* :class:`~medledger.storage.postgres.blobs.PostgresBlobStore` — :class:`~medledger.storage.ports.BlobStore` in a
  ``bytea`` table, for deployments that want one system of record.

**Namespaces.** Every store lives in its own PostgreSQL schema (several nodes
and chains can share one database); connections of a store's pool have their
``search_path`` set to it.

**Migrations** (:mod:`~medledger.storage.postgres.migrations`). Each schema has a ``schema_migrations`` table (version, name,
time). Opening a store applies the migrations it lacks, in one transaction
under an advisory lock; a schema *newer* than this code knows, or a schema
holding another kind of store, is refused with one :class:`StorageError` at
open — never a failure mid-run.

**Durability.** A write returns only after PostgreSQL committed it with
``synchronous_commit`` at least ``on`` (forced if the server default is
``off``): an ack means the commit record reached the server's WAL on disk.
A block is one transaction; if the connection drops *during* ``COMMIT`` the
outcome is looked up by transaction id (``pg_xact_status``) before anything
is reported, so a committed block is never reported as failed nor the reverse.

**Errors.** Every psycopg error becomes a :class:`StorageError`:

::

    StorageError
    ├── RetryableStorageError   connection lost, server restarting or down,
    │                           pool exhausted, serialization failure: retry later
    └── (plain)                 anything else: bad data, permissions, a bug
    Conflict                    a height or key that is already taken
    NotFound                    no such store / block / transaction / node

At open, a bad DSN, an unreachable server, a wrong password or a missing
database is one clear ``StorageError`` naming ``user@host:port/db`` (never the
password). After a restart of PostgreSQL the pool replaces its dead
connections on their next use; the node needs no restart.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolClosed

from medledger.core.errors import (
    Conflict,
    InvalidInput,
    MedledgerError,
    RetryableStorageError,
    StorageError,
    StorageFull,
)
from medledger.core.hashing import sha256

__all__ = [
    "CONNECT_TIMEOUT_S",
    "Conn",
    "IN_DOUBT_TIMEOUT_S",
    "MAX_KEY",
    "POOL_TIMEOUT_S",
    "PooledStore",
    "connect",
    "connect_kwargs",
    "describe_dsn",
    "open_pool",
    "reason",
    "schema_name",
    "schema_where",
    "set_session",
    "storage_error",
    "strip_password",
]

Conn = psycopg.Connection[tuple[Any, ...]]

# The pool logs each lost connection as a warning. Without this an unconfigured
# CLI would print them raw beside the one-line error the caller reports; an
# application that configures logging still receives them.
logging.getLogger("psycopg.pool").addHandler(logging.NullHandler())

#: How long one caller waits for a pooled connection before a retryable error.
POOL_TIMEOUT_S = 10.0
#: How long an in-doubt ``COMMIT`` (connection lost mid-commit) is looked up.
IN_DOUBT_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10
MAX_KEY = 2**62  # larger ids cannot be stored (int8): such lookups are simply absent


# -- connections and errors -----------------------------------------------------------


def describe_dsn(dsn: str) -> str:
    """``user@host:port/dbname`` of a DSN, for messages (never the password)."""
    try:
        info = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "an invalid DSN"
    host = str(info.get("host") or info.get("hostaddr") or "localhost")
    port = str(info.get("port") or "5432")
    user = info.get("user")
    db = info.get("dbname") or user or "?"
    return f"{f'{user}@' if user else ''}{host}:{port}/{db}"


def strip_password(dsn: str) -> str:
    """The DSN without a password (supply it by ``PGPASSWORD``, ``~/.pgpass`` or the env DSN)."""
    try:
        info = conninfo_to_dict(dsn)
    except psycopg.Error:
        raise InvalidInput(f"not a valid PostgreSQL DSN ({describe_dsn(dsn)})") from None
    info.pop("password", None)
    return make_conninfo("", **info)


def reason(exc: BaseException) -> str:
    """psycopg's message on one line, without libpq's hints."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    for prefix in ("connection failed: ",):
        text = text.removeprefix(prefix)
    return " ".join(text.replace("FATAL:", "").split())


def connect_kwargs(dsn: str) -> dict[str, Any]:
    try:
        info = conninfo_to_dict(dsn)
    except psycopg.Error:
        raise StorageError(
            "not a valid PostgreSQL DSN: use 'host=H port=P dbname=D user=U'"
            " or 'postgresql://user@host:port/dbname'"
        ) from None
    kwargs: dict[str, Any] = {"autocommit": True, "application_name": "medledger"}
    if "connect_timeout" not in info:
        kwargs["connect_timeout"] = CONNECT_TIMEOUT_S
    return kwargs


def connect(dsn: str) -> Conn:
    """One autocommit connection; every failure is one clear :class:`StorageError`."""
    kwargs = connect_kwargs(dsn)
    try:
        return psycopg.connect(dsn, **kwargs)
    except psycopg.Error as exc:
        raise StorageError(
            f"cannot connect to PostgreSQL {describe_dsn(dsn)}: {reason(exc)}"
        ) from None


def storage_error(exc: psycopg.Error, where: str) -> MedledgerError:
    """Map a psycopg error raised while a store is in use."""
    if isinstance(exc, PoolClosed):
        return StorageError(f"{where}: the store is closed")
    if isinstance(exc, psycopg.errors.UniqueViolation):
        return Conflict(f"{where}: {reason(exc)}")
    if isinstance(exc, psycopg.errors.DiskFull):
        return StorageFull(f"{where}: {reason(exc)} (no space left; nothing was stored)")
    if isinstance(exc, psycopg.OperationalError):
        return RetryableStorageError(
            f"{where}: PostgreSQL is unavailable ({reason(exc)}); retry later"
        )
    return StorageError(f"{where}: {reason(exc)}")


def set_session(conn: Conn, schema: str) -> None:
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    row = conn.execute("SHOW synchronous_commit").fetchone()
    if row is not None and row[0] == "off":
        # An ack means durable: never let a server default turn that off.
        conn.execute("SET synchronous_commit TO on")


def open_pool(
    dsn: str, schema: str, *, max_size: int, name: str, timeout: float = POOL_TIMEOUT_S
) -> ConnectionPool[Conn]:
    kwargs = connect_kwargs(dsn)
    pool: ConnectionPool[Conn] = ConnectionPool(
        dsn,
        min_size=1,
        max_size=max_size,
        kwargs=kwargs,
        configure=lambda conn: set_session(conn, schema),
        # A cheap round trip per checkout: a connection killed by a server
        # restart is replaced before it fails a caller.
        check=ConnectionPool.check_connection,
        timeout=timeout,
        reconnect_timeout=60.0,
        name=name,
        open=False,
    )
    try:
        pool.open(wait=True, timeout=CONNECT_TIMEOUT_S + 5)
    except psycopg.Error as exc:
        pool.close()
        raise StorageError(
            f"cannot open a connection pool to PostgreSQL {describe_dsn(dsn)}: {reason(exc)}"
        ) from None
    return pool


def schema_where(dsn: str, schema: str) -> str:
    return f"PostgreSQL {describe_dsn(dsn)} schema {schema}"


class PooledStore:
    """What every PostgreSQL store shares: DSN, schema, pool and error mapping."""

    def __init__(self, dsn: str, schema: str, pool: ConnectionPool[Conn]) -> None:
        self.dsn = dsn
        self.schema = schema
        self.where = schema_where(dsn, schema)
        self._pool = pool

    @contextmanager
    def _conn(self) -> Iterator[Conn]:
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            raise storage_error(exc, self.where) from None

    def _rows(self, query: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._conn() as conn:
            return conn.execute(query.encode(), args).fetchall()

    def _close_pool(self) -> None:
        self._pool.close()


# -- schema names --------------------------------------------------------------------------


def schema_name(*parts: str) -> str:
    """A schema name from ``parts``: lowercase ``[a-z0-9_]``, at most 63 bytes, collision-safe.

    Names are readable (``ml_st_mary_chain``); when cleaning changed a part or
    the name is too long, a hash of the original parts keeps distinct inputs
    distinct.
    """
    raw = "_".join(parts)
    clean = "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in raw.lower())
    name = f"ml_{clean}"
    if clean != raw or len(name) > 63:
        name = f"{name[:50]}_{sha256(raw.encode()).hex()[:8]}"
    return name
