"""PostgreSQL adapters (psycopg 3, one connection pool per store), for institutions past one box.

* :class:`PostgresChainStore` — :class:`~medledger.storage.ports.ChainStore`,
  the same tables and keys as the SQLite adapter (``node_key`` for Merkle
  nodes, an 8-byte ``hkey`` index for ``tx_by_hash``, level-0 nodes derived
  from transaction data).
* :class:`PostgresRecordIndex` — :class:`~medledger.storage.records.RecordIndex`,
  group-committed like the SQLite index (one transaction per batch).
* :class:`PostgresBlobStore` — :class:`~medledger.storage.blobs.BlobStore` in a
  ``bytea`` table, for deployments that want one system of record.

**Namespaces.** Every store lives in its own PostgreSQL schema (several nodes
and chains can share one database); connections of a store's pool have their
``search_path`` set to it.

**Migrations.** Each schema has a ``schema_migrations`` table (version, name,
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

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolClosed

from medledger.core.errors import (
    Conflict,
    IntegrityError,
    InvalidInput,
    MedledgerError,
    NotFound,
    RetryableStorageError,
    StorageError,
    StorageFull,
)
from medledger.core.hashing import sha256
from medledger.core.merkle import NodeID, leaf_hash
from medledger.core.models import Signature
from medledger.storage.batching import GroupCommitter
from medledger.storage.ports import NewBlock, StoredBlock
from medledger.storage.records import RECOVERY_MARK, VersionRow
from medledger.storage.sqlite import node_from_key, node_key

__all__ = [
    "BLOBS_MIGRATIONS",
    "CHAIN_MIGRATIONS",
    "RECORDS_MIGRATIONS",
    "Migration",
    "PostgresBlobStore",
    "PostgresChainStore",
    "PostgresRecordIndex",
    "connect",
    "describe_dsn",
    "drop_schema",
    "migrate",
    "schema_version",
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
_CONNECT_TIMEOUT_S = 10
_MAX_KEY = 2**62  # larger ids cannot be stored (int8): such lookups are simply absent


# -- migrations -----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Migration:
    """One schema step. ``version`` increases by one per step; ``sql`` runs in the schema."""

    version: int
    name: str
    sql: str


CHAIN_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        name="chain: blocks, transactions (hkey index), Merkle nodes",
        sql="""
CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE blocks (
    height bigint PRIMARY KEY,
    hash bytea NOT NULL,
    header bytea NOT NULL,
    signatures text NOT NULL,
    first_index bigint NOT NULL,
    tx_count integer NOT NULL
);
CREATE INDEX blocks_by_first_index ON blocks(first_index);
-- hkey: the first 8 bytes of the tx hash as a signed integer; lookups confirm the full hash.
CREATE TABLE txs (idx bigint PRIMARY KEY, hkey bigint NOT NULL, data bytea NOT NULL);
CREATE INDEX txs_by_hkey ON txs(hkey);
-- Perfect subtrees of level >= 1, keyed by node_key; leaf hashes derive from txs.data.
CREATE TABLE nodes (id bigint PRIMARY KEY, hash bytea NOT NULL);
""",
    ),
)

RECORDS_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        name="records: versions, blind-index tokens",
        sql="""
CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE versions (
    rtype text NOT NULL,
    rid text NOT NULL,
    version integer NOT NULL,
    blob_hash bytea NOT NULL,
    wrapped_dek bytea,
    kek_id text,
    patient text,
    updated_ms bigint NOT NULL,
    tx_hash bytea NOT NULL,
    erased boolean NOT NULL DEFAULT false,
    PRIMARY KEY (rtype, rid, version)
);
CREATE INDEX versions_by_patient ON versions(patient);
CREATE INDEX versions_by_kek ON versions(kek_id);
CREATE INDEX versions_by_updated ON versions(rtype, updated_ms);
CREATE TABLE tokens (token bytea NOT NULL, rtype text NOT NULL, rid text NOT NULL);
CREATE INDEX tokens_by_token ON tokens(token, rtype);
CREATE INDEX tokens_by_record ON tokens(rtype, rid);
""",
    ),
    Migration(
        version=2,
        name="records: chain height each version was indexed on (crash recovery)",
        sql="""
ALTER TABLE versions ADD COLUMN chain_base bigint;
CREATE INDEX versions_by_chain_base ON versions(chain_base);
""",
    ),
)

BLOBS_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        name="blobs: content-addressed bytea",
        sql="""
CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE blobs (hash bytea PRIMARY KEY, data bytea NOT NULL);
""",
    ),
)

_MIGRATIONS = {"chain": CHAIN_MIGRATIONS, "records": RECORDS_MIGRATIONS, "blobs": BLOBS_MIGRATIONS}


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


def _reason(exc: BaseException) -> str:
    """psycopg's message on one line, without libpq's hints."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    for prefix in ("connection failed: ",):
        text = text.removeprefix(prefix)
    return " ".join(text.replace("FATAL:", "").split())


def _connect_kwargs(dsn: str) -> dict[str, Any]:
    try:
        info = conninfo_to_dict(dsn)
    except psycopg.Error:
        raise StorageError(
            "not a valid PostgreSQL DSN: use 'host=H port=P dbname=D user=U'"
            " or 'postgresql://user@host:port/dbname'"
        ) from None
    kwargs: dict[str, Any] = {"autocommit": True, "application_name": "medledger"}
    if "connect_timeout" not in info:
        kwargs["connect_timeout"] = _CONNECT_TIMEOUT_S
    return kwargs


def connect(dsn: str) -> Conn:
    """One autocommit connection; every failure is one clear :class:`StorageError`."""
    kwargs = _connect_kwargs(dsn)
    try:
        return psycopg.connect(dsn, **kwargs)
    except psycopg.Error as exc:
        raise StorageError(
            f"cannot connect to PostgreSQL {describe_dsn(dsn)}: {_reason(exc)}"
        ) from None


def _storage_error(exc: psycopg.Error, where: str) -> MedledgerError:
    """Map a psycopg error raised while a store is in use."""
    if isinstance(exc, PoolClosed):
        return StorageError(f"{where}: the store is closed")
    if isinstance(exc, psycopg.errors.UniqueViolation):
        return Conflict(f"{where}: {_reason(exc)}")
    if isinstance(exc, psycopg.errors.DiskFull):
        return StorageFull(f"{where}: {_reason(exc)} (no space left; nothing was stored)")
    if isinstance(exc, psycopg.OperationalError):
        return RetryableStorageError(
            f"{where}: PostgreSQL is unavailable ({_reason(exc)}); retry later"
        )
    return StorageError(f"{where}: {_reason(exc)}")


def _set_session(conn: Conn, schema: str) -> None:
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    row = conn.execute("SHOW synchronous_commit").fetchone()
    if row is not None and row[0] == "off":
        # An ack means durable: never let a server default turn that off.
        conn.execute("SET synchronous_commit TO on")


def _open_pool(
    dsn: str, schema: str, *, max_size: int, name: str, timeout: float = POOL_TIMEOUT_S
) -> ConnectionPool[Conn]:
    kwargs = _connect_kwargs(dsn)
    pool: ConnectionPool[Conn] = ConnectionPool(
        dsn,
        min_size=1,
        max_size=max_size,
        kwargs=kwargs,
        configure=lambda conn: _set_session(conn, schema),
        # A cheap round trip per checkout: a connection killed by a server
        # restart is replaced before it fails a caller.
        check=ConnectionPool.check_connection,
        timeout=timeout,
        reconnect_timeout=60.0,
        name=name,
        open=False,
    )
    try:
        pool.open(wait=True, timeout=_CONNECT_TIMEOUT_S + 5)
    except psycopg.Error as exc:
        pool.close()
        raise StorageError(
            f"cannot open a connection pool to PostgreSQL {describe_dsn(dsn)}: {_reason(exc)}"
        ) from None
    return pool


def _schema_where(dsn: str, schema: str) -> str:
    return f"PostgreSQL {describe_dsn(dsn)} schema {schema}"


def schema_version(conn: Conn, schema: str) -> int | None:
    """Applied migration version of ``schema``, ``None`` if it holds no medledger store."""
    table = conn.execute(
        "SELECT to_regclass(%s)", (sql.Identifier(schema, "schema_migrations").as_string(conn),)
    ).fetchone()
    if table is None or table[0] is None:
        return None
    row = conn.execute(
        sql.SQL("SELECT max(version) FROM {}").format(sql.Identifier(schema, "schema_migrations"))
    ).fetchone()
    return 0 if row is None or row[0] is None else int(row[0])


def migrate(
    conn: Conn,
    schema: str,
    kind: str,
    *,
    create: bool,
    meta: dict[str, str] | None = None,
    where: str = "",
    upto: int | None = None,
) -> tuple[int, int]:
    """Bring ``schema`` (a store of ``kind``) to the latest version; ``(before, after)``.

    ``create=True`` requires the schema to hold no medledger store yet (else
    :class:`Conflict`) and records ``meta``; ``create=False`` requires one of
    this ``kind`` (else :class:`NotFound` / :class:`StorageError`). A version
    newer than this code knows raises :class:`StorageError` and changes nothing.
    All steps run in one transaction under an advisory lock on the schema name,
    so concurrent starts apply each migration once. ``upto`` stops at an older
    version (restoring a backup made by an older medledger, then migrating).
    """
    migrations = _MIGRATIONS[kind]
    latest = migrations[-1].version
    target = latest if upto is None else upto
    if not 1 <= target <= latest:
        raise StorageError(
            f"{kind} schema version {target} is not one this medledger knows (1..{latest})"
        )
    where = where or f"schema {schema}"
    ident = sql.Identifier(schema)
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("medledger:" + schema,))
            current = schema_version(conn, schema)
            if create:
                if current is not None:
                    raise Conflict(f"{where} already holds a medledger store")
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
                conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(ident))
                conn.execute(
                    "CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
                    " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                current = 0
            else:
                if current is None:
                    raise NotFound(f"{where} holds no medledger {kind} store")
                conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(ident))
                if current > latest:
                    raise StorageError(
                        f"{where}: schema version {current} is newer than this medledger"
                        f" supports ({latest}); upgrade medledger"
                    )
                if current >= 1:
                    row = conn.execute("SELECT value FROM meta WHERE key = 'kind'").fetchone()
                    if row is None or row[0] != kind:
                        raise StorageError(
                            f"{where} holds a medledger {row[0] if row else 'unknown'} store,"
                            f" not a {kind} store"
                        )
            before = current
            for step in migrations:
                if current < step.version <= target:
                    conn.execute(step.sql.encode())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (step.version, step.name),
                    )
            if create:
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO meta (key, value) VALUES (%s, %s)",
                        [("kind", kind), *(meta or {}).items()],
                    )
    except psycopg.Error as exc:
        raise StorageError(f"{where}: cannot apply schema migrations ({_reason(exc)})") from None
    return before, max(before, target)


def drop_schema(dsn: str, schema: str) -> None:
    """Drop a store's schema and everything in it (benchmarks, tests, failed ``node init``)."""
    with connect(dsn) as conn:
        try:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        except psycopg.Error as exc:
            raise StorageError(f"{_schema_where(dsn, schema)}: {_reason(exc)}") from None


def _read_meta(conn: Conn, schema: str) -> dict[str, str]:
    rows = conn.execute(
        sql.SQL("SELECT key, value FROM {}").format(sql.Identifier(schema, "meta"))
    ).fetchall()
    return {str(k): str(v) for k, v in rows}


class _PooledStore:
    """What every PostgreSQL store shares: DSN, schema, pool and error mapping."""

    def __init__(self, dsn: str, schema: str, pool: ConnectionPool[Conn]) -> None:
        self.dsn = dsn
        self.schema = schema
        self.where = _schema_where(dsn, schema)
        self._pool = pool

    @contextmanager
    def _conn(self) -> Iterator[Conn]:
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            raise _storage_error(exc, self.where) from None

    def _rows(self, query: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._conn() as conn:
            return conn.execute(query.encode(), args).fetchall()

    def _close_pool(self) -> None:
        self._pool.close()


def _open_schema(
    dsn: str, schema: str, kind: str, *, create: bool, meta: dict[str, str] | None = None
) -> dict[str, str]:
    """Connect (one clear error if that fails), migrate, and return the store's meta."""
    with connect(dsn) as conn:
        migrate(conn, schema, kind, create=create, meta=meta, where=_schema_where(dsn, schema))
        try:
            return _read_meta(conn, schema)
        except psycopg.Error as exc:
            raise StorageError(f"{_schema_where(dsn, schema)}: {_reason(exc)}") from None


# -- chain store ------------------------------------------------------------------------


def _hkey(tx_hash: bytes) -> int:
    return int.from_bytes(tx_hash[:8], "big", signed=True)


_BLOCK_SELECT = (
    "SELECT b.height, b.hash, b.header, b.signatures, b.first_index,"
    " ARRAY(SELECT t.data FROM txs t WHERE t.idx >= b.first_index"
    " AND t.idx < b.first_index + b.tx_count ORDER BY t.idx) FROM blocks b"
)


class PostgresChainStore(_PooledStore):
    """A chain in one PostgreSQL schema. Create with :meth:`create`, open with :meth:`open`.

    Thread-safe: writes are serialized per handle (and by the height check
    across handles and processes); reads use any pooled connection. Each read
    is one statement, so it sees whole blocks only.
    """

    def __init__(self, dsn: str, schema: str, chain: str, pool: ConnectionPool[Conn]) -> None:
        super().__init__(dsn, schema, pool)
        self.chain = chain
        self._write_lock = threading.Lock()

    @staticmethod
    def default_schema(chain: str) -> str:
        """A schema name for ``chain`` when the caller gives none."""
        return schema_name("chain", chain)

    @classmethod
    def create(
        cls,
        dsn: str,
        chain: str,
        *,
        schema: str | None = None,
        pool_size: int = 4,
        pool_timeout: float = POOL_TIMEOUT_S,
    ) -> PostgresChainStore:
        """Create an empty chain in ``schema`` (which must hold no medledger store).

        ``pool_timeout``: how long a call waits for a working connection (e.g.
        while PostgreSQL restarts) before it raises ``RetryableStorageError``.
        """
        schema = schema or cls.default_schema(chain)
        _open_schema(dsn, schema, "chain", create=True, meta={"chain": chain})
        pool = _open_pool(dsn, schema, max_size=pool_size, name=schema, timeout=pool_timeout)
        return cls(dsn, schema, chain, pool)

    @classmethod
    def open(
        cls,
        dsn: str,
        chain: str | None = None,
        *,
        schema: str | None = None,
        pool_size: int = 4,
        pool_timeout: float = POOL_TIMEOUT_S,
    ) -> PostgresChainStore:
        """Open an existing chain (applying pending migrations); ``chain`` is checked if given."""
        if schema is None:
            if chain is None:
                raise InvalidInput("give the chain id or the schema of the chain store")
            schema = cls.default_schema(chain)
        meta = _open_schema(dsn, schema, "chain", create=False)
        stored = meta.get("chain")
        if stored is None or (chain is not None and stored != chain):
            raise StorageError(
                f"{_schema_where(dsn, schema)} holds chain {stored!r}, not {chain!r}"
            )
        pool = _open_pool(dsn, schema, max_size=pool_size, name=schema, timeout=pool_timeout)
        return cls(dsn, schema, stored, pool)

    def close(self) -> None:
        self._close_pool()

    # -- writes ------------------------------------------------------------

    def append_block(self, block: NewBlock) -> None:
        """Write the block in one transaction; return once committed (durable)."""
        height = block.header.height
        first = block.first_index
        sigs = json.dumps([s.to_json() for s in block.signatures], separators=(",", ":"))
        txs = [
            (first + i, _hkey(h), d)
            for i, (h, d) in enumerate(zip(block.tx_hashes, block.tx_data, strict=True))
        ]
        nodes = [(node_key(n), h) for n, h in block.nodes]
        with self._write_lock:
            xid: str | None = None
            committing = False
            try:
                with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                    row = cur.execute(
                        b"SELECT pg_current_xact_id()::text, (SELECT max(height) FROM blocks)"
                    ).fetchone()
                    assert row is not None
                    xid, top = row
                    expected = 0 if top is None else top + 1
                    if height != expected:
                        raise Conflict(f"block height {height} does not follow head {expected - 1}")
                    cur.execute(
                        b"INSERT INTO blocks (height, hash, header, signatures, first_index,"
                        b" tx_count) VALUES (%s, %s, %s, %s, %s, %s)",
                        (height, block.block_hash, block.header_bytes, sigs, first, len(txs)),
                    )
                    if txs:
                        with cur.copy(
                            b"COPY txs (idx, hkey, data) FROM STDIN (FORMAT BINARY)"
                        ) as cp:
                            cp.set_types(["int8", "int8", "bytea"])
                            for r in txs:
                                cp.write_row(r)
                    if nodes:
                        with cur.copy(b"COPY nodes (id, hash) FROM STDIN (FORMAT BINARY)") as cp:
                            cp.set_types(["int8", "bytea"])
                            for n in nodes:
                                cp.write_row(n)
                    committing = True  # leaving the block sends COMMIT
            except psycopg.errors.UniqueViolation as exc:
                raise Conflict(
                    f"{self.where}: block {height} overlaps stored data ({_reason(exc)})"
                ) from None
            except psycopg.Error as exc:
                if committing and xid is not None and isinstance(exc, psycopg.OperationalError):
                    self._resolve_in_doubt(xid, height, block.block_hash, exc)
                    return
                raise _storage_error(exc, f"{self.where}: block {height}") from None

    def _resolve_in_doubt(self, xid: str, height: int, block_hash: bytes, exc: Exception) -> None:
        """The connection died during COMMIT: return if it committed, else raise retryable."""
        deadline = time.monotonic() + IN_DOUBT_TIMEOUT_S
        while True:
            try:
                with psycopg.connect(self.dsn, **_connect_kwargs(self.dsn)) as conn:
                    _set_session(conn, self.schema)
                    row = conn.execute(
                        "SELECT pg_xact_status(%s::xid8), (SELECT hash FROM blocks WHERE height = %s)",
                        (xid, height),
                    ).fetchone()
                assert row is not None
                status, stored = row
                if status == "committed" and stored is not None and bytes(stored) == block_hash:
                    return
                if status != "in progress":
                    raise RetryableStorageError(
                        f"{self.where}: block {height} was not committed"
                        f" (connection lost: {_reason(exc)}); retry"
                    )
            except psycopg.Error:
                pass
            if time.monotonic() >= deadline:
                raise RetryableStorageError(
                    f"{self.where}: block {height}: connection lost during COMMIT and PostgreSQL"
                    " stayed unreachable; its outcome is unknown until the chain is reopened"
                )
            time.sleep(0.2)

    # -- reads -------------------------------------------------------------

    def _stored(self, row: Sequence[Any]) -> StoredBlock:
        height, block_hash, header, sigs, first, txs = row
        try:
            signatures = tuple(Signature.from_json(s) for s in json.loads(sigs))
        except (ValueError, TypeError, InvalidInput) as exc:
            raise IntegrityError(
                f"block {height}: stored signatures are unreadable ({exc})"
            ) from None
        return StoredBlock(
            height=int(height),
            header_bytes=bytes(header),
            block_hash=bytes(block_hash),
            signatures=signatures,
            first_index=int(first),
            tx_data=tuple(bytes(t) for t in txs),
        )

    def head(self) -> StoredBlock | None:
        rows = self._rows(_BLOCK_SELECT + " ORDER BY b.height DESC LIMIT 1")
        return self._stored(rows[0]) if rows else None

    def head_header_bytes(self) -> bytes | None:
        rows = self._rows("SELECT header FROM blocks ORDER BY height DESC LIMIT 1")
        return bytes(rows[0][0]) if rows else None

    def block(self, height: int) -> StoredBlock:
        rows = (
            self._rows(_BLOCK_SELECT + " WHERE b.height = %s", (height,))
            if 0 <= height < _MAX_KEY
            else []
        )
        if not rows:
            raise NotFound(f"no block at height {height}")
        return self._stored(rows[0])

    def block_hash(self, height: int) -> bytes:
        rows = (
            self._rows("SELECT hash FROM blocks WHERE height = %s", (height,))
            if 0 <= height < _MAX_KEY
            else []
        )
        if not rows:
            raise NotFound(f"no block at height {height}")
        return bytes(rows[0][0])

    def iter_blocks(self, start: int = 0, end: int | None = None) -> Iterator[StoredBlock]:
        """Blocks in pages of 256; bounded by the head seen when iteration starts."""
        start = max(start, 0)
        top = self._rows("SELECT max(height) FROM blocks")[0][0]
        stop = -1 if top is None else top + 1
        if end is not None:
            stop = min(stop, end)
        while start < stop:
            rows = self._rows(
                _BLOCK_SELECT
                + " WHERE b.height >= %s AND b.height < %s ORDER BY b.height LIMIT 256",
                (start, stop),
            )
            if not rows:
                return
            for row in rows:
                yield self._stored(row)
            start = int(rows[-1][0]) + 1

    def node_hashes(self, ids: Sequence[NodeID]) -> dict[NodeID, bytes]:
        leaves = sorted({n.index for n in ids if n.level == 0 and n.index < _MAX_KEY})
        keys = sorted({node_key(n) for n in ids if n.level > 0 and node_key(n) < _MAX_KEY})
        with self._conn() as conn:
            data = (
                dict(
                    conn.execute(
                        b"SELECT idx, data FROM txs WHERE idx = ANY(%s::int8[])", (leaves,)
                    ).fetchall()
                )
                if leaves
                else {}
            )
            hashes = (
                dict(
                    conn.execute(
                        b"SELECT id, hash FROM nodes WHERE id = ANY(%s::int8[])", (keys,)
                    ).fetchall()
                )
                if keys
                else {}
            )
        out: dict[NodeID, bytes] = {}
        for node in ids:
            if node in out:
                continue
            if node.level == 0:
                found = data.get(node.index)
                if found is not None:
                    out[node] = leaf_hash(bytes(found))
                    continue
            else:
                found = hashes.get(node_key(node))
                if found is not None:
                    out[node] = bytes(found)
                    continue
            raise NotFound(f"merkle node level {node.level} index {node.index} not stored")
        return out

    def iter_nodes(self) -> Iterator[tuple[NodeID, bytes]]:
        """Nodes in key (= creation) order, in pages; bounded by the last node at start."""
        top = self._rows("SELECT max(id) FROM nodes")[0][0]
        if top is None:
            return
        after = -1
        while after < top:
            rows = self._rows(
                "SELECT id, hash FROM nodes WHERE id > %s AND id <= %s ORDER BY id LIMIT 8192",
                (after, top),
            )
            if not rows:
                return
            for key, h in rows:
                yield node_from_key(int(key)), bytes(h)
            after = int(rows[-1][0])

    def tx_by_hash(self, tx_hash: bytes) -> tuple[int, bytes]:
        for idx, data in self._rows("SELECT idx, data FROM txs WHERE hkey = %s", (_hkey(tx_hash),)):
            if sha256(bytes(data)) == tx_hash:
                return int(idx), bytes(data)
        raise NotFound(f"no transaction {tx_hash.hex()}")

    def tx_location(self, tx_hash: bytes) -> tuple[int, int]:
        rows = self._rows(
            "SELECT t.idx, t.data, (SELECT b.height FROM blocks b WHERE b.first_index <= t.idx"
            " AND b.first_index + b.tx_count > t.idx ORDER BY b.first_index DESC LIMIT 1)"
            " FROM txs t WHERE t.hkey = %s",
            (_hkey(tx_hash),),
        )
        for idx, data, height in rows:
            if sha256(bytes(data)) == tx_hash:
                if height is None:
                    raise NotFound(f"no block holds transaction {tx_hash.hex()}")
                return int(height), int(idx)
        raise NotFound(f"no transaction {tx_hash.hex()}")

    def tx_data(self, index: int) -> bytes:
        rows = (
            self._rows("SELECT data FROM txs WHERE idx = %s", (index,))
            if 0 <= index < _MAX_KEY
            else []
        )
        if not rows:
            raise NotFound(f"no transaction at log index {index}")
        return bytes(rows[0][0])

    def damage(self) -> str | None:
        """``None``: PostgreSQL reports corruption as errors of the failing statement."""
        return None

    def check_storage(self) -> None:
        """PostgreSQL keeps its own pages consistent; a failing read here raises ``StorageError``."""
        self._rows("SELECT height FROM blocks ORDER BY height DESC LIMIT 1")

    def counts(self) -> tuple[int, int, int]:
        b, t, n = self._rows(
            "SELECT (SELECT count(*) FROM blocks), (SELECT count(*) FROM txs),"
            " (SELECT count(*) FROM nodes)"
        )[0]
        return int(b), int(t), int(n)


# -- record index -------------------------------------------------------------------------

_COLS = (
    "rtype, rid, version, blob_hash, wrapped_dek, kek_id, patient, updated_ms, tx_hash, erased,"
    " chain_base"
)


def _version_row(r: Sequence[Any]) -> VersionRow:
    return VersionRow(
        resource_type=r[0],
        id=r[1],
        version=int(r[2]),
        blob_hash=bytes(r[3]),
        wrapped_dek=None if r[4] is None else bytes(r[4]),
        kek_id=r[5],
        patient=r[6],
        updated_ms=int(r[7]),
        tx_hash=bytes(r[8]),
        erased=bool(r[9]),
        chain_base=None if r[10] is None else int(r[10]),
    )


def _pg_values(row: VersionRow) -> tuple[Any, ...]:
    return (*row.values()[:9], bool(row.erased), row.chain_base)


class PostgresRecordIndex(_PooledStore):
    """:class:`~medledger.storage.records.RecordIndex` in one PostgreSQL schema.

    Writes are group committed: concurrent ``put_version`` / ``remove_version``
    calls become one transaction (pipelined statements, one commit); a call
    returns once its batch committed. A ``put_version`` of a version that is
    already stored gets :class:`Conflict` without failing the rest of its batch.
    """

    @classmethod
    def initialize(cls, dsn: str, *, schema: str) -> None:
        """Create an empty index in ``schema`` (which must hold no medledger store)."""
        _open_schema(dsn, schema, "records", create=True)

    def __init__(self, dsn: str, *, schema: str, pool_size: int = 4) -> None:
        """Open the index in ``schema`` (applying pending migrations)."""
        _open_schema(dsn, schema, "records", create=False)
        super().__init__(dsn, schema, _open_pool(dsn, schema, max_size=pool_size, name=schema))
        self._writes: GroupCommitter[tuple[str, Any]] = GroupCommitter(
            self._apply, name="medledger-index-pg"
        )

    # -- writes ----------------------------------------------------------------

    def _apply(self, ops: Sequence[tuple[str, Any]]) -> list[BaseException | None]:
        results: list[BaseException | None] = [None] * len(ops)
        try:
            with self._pool.connection() as conn:
                keys = [(row.resource_type, row.id, row.version) for kind, (row, _) in _puts(ops)]
                taken: set[tuple[str, str, int]] = set()
                if keys:
                    taken = {
                        (str(a), str(b), int(c))
                        for a, b, c in conn.execute(
                            b"SELECT rtype, rid, version FROM versions WHERE (rtype, rid, version)"
                            b" IN (SELECT * FROM unnest(%s::text[], %s::text[], %s::int4[]))",
                            ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]),
                        ).fetchall()
                    }
                with conn.transaction(), conn.pipeline(), conn.cursor() as cur:
                    for i, (kind, arg) in enumerate(ops):
                        if kind == "put":
                            row, tokens = arg
                            key = (row.resource_type, row.id, row.version)
                            if key in taken:
                                results[i] = Conflict(
                                    f"{row.resource_type}/{row.id} version {row.version}"
                                    " already exists"
                                )
                                continue
                            taken.add(key)
                            cur.execute(
                                f"INSERT INTO versions ({_COLS}) VALUES"
                                " (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)".encode(),
                                _pg_values(row),
                            )
                            cur.execute(
                                b"DELETE FROM tokens WHERE rtype = %s AND rid = %s",
                                (row.resource_type, row.id),
                            )
                            if tokens:
                                cur.executemany(
                                    b"INSERT INTO tokens (token, rtype, rid) VALUES (%s, %s, %s)",
                                    [(t, row.resource_type, row.id) for t in tokens],
                                )
                        elif kind == "remove":
                            taken.discard(arg)
                            cur.execute(
                                b"DELETE FROM versions WHERE rtype = %s AND rid = %s"
                                b" AND version = %s",
                                arg,
                            )
                        elif kind == "tokens":
                            rtype, rid, tokens = arg
                            cur.execute(
                                b"DELETE FROM tokens WHERE rtype = %s AND rid = %s", (rtype, rid)
                            )
                            if tokens:
                                cur.executemany(
                                    b"INSERT INTO tokens (token, rtype, rid) VALUES (%s, %s, %s)",
                                    [(t, rtype, rid) for t in tokens],
                                )
                        elif kind == "mark":
                            cur.execute(
                                b"INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT (key)"
                                b" DO UPDATE SET value = EXCLUDED.value",
                                (RECOVERY_MARK, str(arg)),
                            )
                        else:
                            results[i] = StorageError(f"unknown index operation {kind}")
        except psycopg.Error as exc:
            err = _storage_error(exc, self.where)
            return [err] * len(ops)
        return results

    async def put_version(self, row: VersionRow, tokens: set[bytes]) -> None:
        """Add a version and make ``tokens`` the resource's search tokens; ``Conflict`` if taken."""
        await self._writes.submit(("put", (row, tokens)))

    async def remove_version(self, resource_type: str, rid: str, version: int) -> None:
        """Undo a ``put_version`` whose chain commit failed."""
        await self._writes.submit(("remove", (resource_type, rid, version)))

    async def set_tokens(self, resource_type: str, rid: str, tokens: set[bytes]) -> None:
        """Make ``tokens`` the resource's search tokens (e.g. after undoing a failed write)."""
        await self._writes.submit(("tokens", (resource_type, rid, tokens)))

    async def set_recovery_mark(self, height: int) -> None:
        """Record that every version with ``chain_base < height`` is settled (durably)."""
        await self._writes.submit(("mark", height))

    async def erase(self, resource_type: str, rid: str) -> list[bytes]:
        """Destroy every wrapped data key and token of a resource; return its blob hashes.

        Then ``VACUUM``s both tables so the old row versions holding the wrapped
        keys are reclaimed (WAL segments keep them until recycled).
        """

        def run() -> list[bytes]:
            with self._conn() as conn:
                with conn.transaction():
                    rows = conn.execute(
                        b"SELECT blob_hash FROM versions WHERE rtype = %s AND rid = %s FOR UPDATE",
                        (resource_type, rid),
                    ).fetchall()
                    if not rows:
                        raise NotFound(f"{resource_type}/{rid} does not exist")
                    conn.execute(
                        b"UPDATE versions SET wrapped_dek = NULL, kek_id = NULL, erased = true"
                        b" WHERE rtype = %s AND rid = %s",
                        (resource_type, rid),
                    )
                    conn.execute(
                        b"DELETE FROM tokens WHERE rtype = %s AND rid = %s", (resource_type, rid)
                    )
                conn.execute(b"VACUUM versions, tokens")
                return [bytes(r[0]) for r in rows]

        result: list[bytes] = await self._writes.run_exclusive(run)
        return result

    async def rewrap(
        self, old_kek_id: str, new_kek_id: str, fn: Callable[[VersionRow], bytes]
    ) -> int:
        """Re-wrap every data key wrapped by ``old_kek_id`` (``fn`` gives the new wrapping)."""

        def run() -> int:
            done = 0
            with self._conn() as conn:
                while True:
                    rows = [
                        _version_row(r)
                        for r in conn.execute(
                            f"SELECT {_COLS} FROM versions WHERE kek_id = %s LIMIT 2000".encode(),
                            (old_kek_id,),
                        ).fetchall()
                    ]
                    if not rows:
                        break
                    updates = [(fn(r), new_kek_id, r.resource_type, r.id, r.version) for r in rows]
                    with conn.transaction(), conn.cursor() as cur:
                        cur.executemany(
                            b"UPDATE versions SET wrapped_dek = %s, kek_id = %s WHERE rtype = %s"
                            b" AND rid = %s AND version = %s AND kek_id IS NOT NULL",
                            updates,
                        )
                    done += len(rows)
                conn.execute(b"VACUUM versions")
            return done

        count: int = await self._writes.run_exclusive(run)
        return count

    # -- reads -----------------------------------------------------------------

    def latest(self, resource_type: str, rid: str) -> VersionRow | None:
        rows = self._rows(
            f"SELECT {_COLS} FROM versions WHERE rtype = %s AND rid = %s"
            " ORDER BY version DESC LIMIT 1",
            (resource_type, rid),
        )
        return _version_row(rows[0]) if rows else None

    def get_version(self, resource_type: str, rid: str, version: int) -> VersionRow | None:
        if not -(2**31) <= version < 2**31:
            return None
        rows = self._rows(
            f"SELECT {_COLS} FROM versions WHERE rtype = %s AND rid = %s AND version = %s",
            (resource_type, rid, version),
        )
        return _version_row(rows[0]) if rows else None

    def history(self, resource_type: str, rid: str) -> list[VersionRow]:
        return [
            _version_row(r)
            for r in self._rows(
                f"SELECT {_COLS} FROM versions WHERE rtype = %s AND rid = %s ORDER BY version DESC",
                (resource_type, rid),
            )
        ]

    def type_history(self, resource_type: str, limit: int) -> list[VersionRow]:
        return [
            _version_row(r)
            for r in self._rows(
                f"SELECT {_COLS} FROM versions WHERE rtype = %s ORDER BY updated_ms DESC LIMIT %s",
                (resource_type, min(limit, _MAX_KEY)),
            )
        ]

    def versions_since(self, updated_ms: int) -> list[VersionRow]:
        """Every version written at or after ``updated_ms``, newest first (crash recovery)."""
        return [
            _version_row(r)
            for r in self._rows(
                f"SELECT {_COLS} FROM versions WHERE updated_ms >= %s ORDER BY updated_ms DESC",
                (updated_ms,),
            )
        ]

    def unsettled(self, from_base: int) -> list[VersionRow]:
        """Versions indexed on chain height ``from_base`` or later, oldest first (crash recovery)."""
        return [
            _version_row(r)
            for r in self._rows(
                f"SELECT {_COLS} FROM versions WHERE chain_base >= %s"
                " ORDER BY chain_base, rtype, rid, version",
                (from_base,),
            )
        ]

    def max_chain_base(self) -> int | None:
        """The highest chain height any version was indexed on (the chain held it durably)."""
        value = self._rows("SELECT max(chain_base) FROM versions")[0][0]
        return None if value is None else int(value)

    def recovery_mark(self) -> int:
        """Chain height from which versions may still be unsettled (0 if never recorded)."""
        rows = self._rows("SELECT value FROM meta WHERE key = %s", (RECOVERY_MARK,))
        return int(rows[0][0]) if rows else 0

    def iter_versions(self) -> Iterator[VersionRow]:
        """Every version row in key order, read in pages (store checks and sweeps)."""
        after: tuple[str, str, int] = ("", "", -1)
        while True:
            rows = self._rows(
                f"SELECT {_COLS} FROM versions WHERE (rtype, rid, version) > (%s, %s, %s)"
                " ORDER BY rtype, rid, version LIMIT 1000",
                after,
            )
            if not rows:
                return
            for r in rows:
                yield _version_row(r)
            after = (str(rows[-1][0]), str(rows[-1][1]), int(rows[-1][2]))

    def search(self, resource_type: str, groups: list[set[bytes]]) -> list[str]:
        """Ids whose tokens match at least one token of every group."""
        found: set[str] | None = None
        for group in sorted(groups, key=len):
            ids = {
                str(r[0])
                for r in self._rows(
                    "SELECT DISTINCT rid FROM tokens WHERE rtype = %s AND token = ANY(%s::bytea[])",
                    (resource_type, list(group)),
                )
            }
            found = ids if found is None else found & ids
            if not found:
                return []
        return sorted(found or ())

    def records_of_patient(self, pseudonym: str) -> list[tuple[str, str]]:
        return [
            (str(r[0]), str(r[1]))
            for r in self._rows(
                "SELECT DISTINCT rtype, rid FROM versions WHERE patient = %s", (pseudonym,)
            )
        ]

    def count_wrapped_by(self, kek_id: str) -> int:
        return int(self._rows("SELECT count(*) FROM versions WHERE kek_id = %s", (kek_id,))[0][0])

    async def close(self) -> None:
        await self._writes.close()
        self._close_pool()


def _puts(ops: Sequence[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    return ((kind, arg) for kind, arg in ops if kind == "put")


# -- blob store ---------------------------------------------------------------------------


class PostgresBlobStore(_PooledStore):
    """:class:`~medledger.storage.blobs.BlobStore` as a ``bytea`` table.

    ``put_many`` writes a batch in one transaction (durable when it returns);
    ``get`` re-hashes what it reads and raises :class:`IntegrityError` for
    altered bytes, like the filesystem store.
    """

    @classmethod
    def initialize(cls, dsn: str, *, schema: str) -> None:
        """Create an empty blob table in ``schema`` (which must hold no medledger store)."""
        _open_schema(dsn, schema, "blobs", create=True)

    def __init__(self, dsn: str, *, schema: str, pool_size: int = 4) -> None:
        _open_schema(dsn, schema, "blobs", create=False)
        super().__init__(dsn, schema, _open_pool(dsn, schema, max_size=pool_size, name=schema))

    def put(self, data: bytes) -> bytes:
        return self.put_many([data])[0]

    def put_many(self, blobs: Sequence[bytes]) -> list[bytes]:
        hashes = [sha256(b) for b in blobs]
        if not blobs:
            return hashes
        with self._conn() as conn, conn.transaction(), conn.cursor() as cur:
            cur.executemany(
                b"INSERT INTO blobs (hash, data) VALUES (%s, %s) ON CONFLICT (hash) DO NOTHING",
                list(zip(hashes, blobs, strict=True)),
            )
        return hashes

    def get(self, blob_hash: bytes) -> bytes:
        rows = self._rows("SELECT data FROM blobs WHERE hash = %s", (blob_hash,))
        if not rows:
            raise NotFound(f"blob {blob_hash.hex()[:16]}… is not stored")
        data = bytes(rows[0][0])
        if sha256(data) != blob_hash:
            raise IntegrityError(f"blob {blob_hash.hex()[:16]}… does not match its hash")
        return data

    def delete(self, blob_hash: bytes) -> None:
        self._rows("DELETE FROM blobs WHERE hash = %s RETURNING 1", (blob_hash,))

    def exists(self, blob_hash: bytes) -> bool:
        return bool(self._rows("SELECT 1 FROM blobs WHERE hash = %s", (blob_hash,)))

    def iter_hashes(self, *, older_than: float | None = None) -> Iterator[bytes]:
        """Every stored hash, in pages. Rows carry no write time, so none is provably older
        than ``older_than``: with it, nothing is listed (an orphan sweep removes nothing)."""
        if older_than is not None:
            return
        after = b""
        while True:
            rows = self._rows(
                "SELECT hash FROM blobs WHERE hash > %s ORDER BY hash LIMIT 1000", (after,)
            )
            if not rows:
                return
            for (blob_hash,) in rows:
                yield bytes(blob_hash)
            after = bytes(rows[-1][0])

    def close(self) -> None:
        self._close_pool()


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
