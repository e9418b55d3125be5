"""Versioned schema steps of each PostgreSQL store, applied at open under an advisory lock."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
import psycopg.errors
from psycopg import sql

from medledger.core.errors import (
    Conflict,
    NotFound,
    StorageError,
)
from medledger.storage.oauth import OAUTH_SCHEMA, OAUTH_TOKEN_SCOPE
from medledger.storage.postgres.connection import Conn, connect, reason, schema_where

__all__ = [
    "BLOBS_MIGRATIONS",
    "CHAIN_MIGRATIONS",
    "MIGRATIONS",
    "NONCES_MIGRATIONS",
    "RECORDS_MIGRATIONS",
    "TOKENS_MIGRATIONS",
    "Migration",
    "drop_schema",
    "migrate",
    "open_or_create_schema",
    "open_schema",
    "read_meta",
    "schema_version",
]


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
    Migration(
        version=2,
        name="chain: the sequencer lease's epoch and the active sequencer's address",
        sql="""
-- At most one row (made by the first lease taken, not here: a restore copies the table):
-- the epoch grows at each takeover of the sequencer role (storage.postgres.lease), and a
-- fenced block append must still see its own epoch here, in the same transaction.
CREATE TABLE sequencer (
    id integer PRIMARY KEY CHECK (id = 1),
    epoch bigint NOT NULL,
    address text,
    since_ms bigint
);
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
    Migration(
        version=3,
        name="records: deletions (FHIR delete keeps the older versions)",
        sql="""
ALTER TABLE versions ADD COLUMN deleted boolean NOT NULL DEFAULT false;
""",
    ),
    Migration(
        version=4,
        name="records: versions whose search tokens follow their acknowledgement",
        sql="""
CREATE TABLE pending_tokens (
    rtype text NOT NULL,
    rid text NOT NULL,
    version integer NOT NULL,
    PRIMARY KEY (rtype, rid, version)
);
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

TOKENS_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        name="tokens: API bearer tokens (id, SHA-256 of the secret, role, expiry, revocation)",
        sql="""
CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE tokens (
    id text PRIMARY KEY,
    secret_hash bytea NOT NULL,
    role text NOT NULL,
    patient text,
    label text NOT NULL,
    created_ms bigint NOT NULL,
    expires_ms bigint,
    revoked boolean NOT NULL DEFAULT false
);
""",
    ),
)

NONCES_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        name="nonces: peer-request nonces seen (replay protection)",
        sql="""
CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE nonces (
    reader text NOT NULL,
    nonce text NOT NULL,
    time_ms bigint NOT NULL,
    PRIMARY KEY (reader, nonce)
);
CREATE INDEX nonces_time ON nonces (time_ms);
""",
    ),
)

OAUTH_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        name="oauth: clients, sign-in steps and codes, grants, access and refresh tokens",
        sql="CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);\n" + OAUTH_SCHEMA,
    ),
    Migration(
        version=2,
        name="oauth: an access token's own scope (a refresh asked for less than the grant)",
        sql=OAUTH_TOKEN_SCOPE,
    ),
)

MIGRATIONS = {
    "chain": CHAIN_MIGRATIONS,
    "records": RECORDS_MIGRATIONS,
    "blobs": BLOBS_MIGRATIONS,
    "tokens": TOKENS_MIGRATIONS,
    "nonces": NONCES_MIGRATIONS,
    "oauth": OAUTH_MIGRATIONS,
}


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
    migrations = MIGRATIONS[kind]
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
        raise StorageError(f"{where}: cannot apply schema migrations ({reason(exc)})") from None
    return before, max(before, target)


def drop_schema(dsn: str, schema: str) -> None:
    """Drop a store's schema and everything in it (benchmarks, tests, failed ``node init``)."""
    with connect(dsn) as conn:
        try:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        except psycopg.Error as exc:
            raise StorageError(f"{schema_where(dsn, schema)}: {reason(exc)}") from None


def read_meta(conn: Conn, schema: str) -> dict[str, str]:
    rows = conn.execute(
        sql.SQL("SELECT key, value FROM {}").format(sql.Identifier(schema, "meta"))
    ).fetchall()
    return {str(k): str(v) for k, v in rows}


def open_or_create_schema(dsn: str, schema: str, kind: str) -> bool:
    """Open ``schema`` (a store of ``kind``), creating it when absent; ``True`` if created.

    For stores a node gained after it was created (tokens and nonces of a
    PostgreSQL node): its first open creates them.
    """
    try:
        open_schema(dsn, schema, kind, create=False)
        return False
    except NotFound:
        pass
    try:
        open_schema(dsn, schema, kind, create=True)
        return True
    except Conflict:  # another process created it meanwhile
        open_schema(dsn, schema, kind, create=False)
        return False


def open_schema(
    dsn: str, schema: str, kind: str, *, create: bool, meta: dict[str, str] | None = None
) -> dict[str, str]:
    """Connect (one clear error if that fails), migrate, and return the store's meta."""
    with connect(dsn) as conn:
        migrate(conn, schema, kind, create=create, meta=meta, where=schema_where(dsn, schema))
        try:
            return read_meta(conn, schema)
        except psycopg.Error as exc:
            raise StorageError(f"{schema_where(dsn, schema)}: {reason(exc)}") from None
