"""Choose a storage adapter by name: ``"sqlite"`` (embedded default) or ``"postgres"``.

The composition root (``node.py``) calls only these functions, so the rest of
medledger never names an adapter. For SQLite ``target`` is a file path (the
blob store's: a directory); for PostgreSQL it is a DSN and ``schema`` names
the store's schema (see :func:`node_schema`). An adapter's module is imported
only when that adapter is opened: a command that opens one store loads one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Final

from medledger.core.errors import InvalidInput

if TYPE_CHECKING:
    from medledger.storage.ports import (
        BlobStore,
        ChainStore,
        NonceStore,
        OAuthStore,
        RecordIndex,
        TokenStore,
    )
    from medledger.storage.postgres.lease import SequencerLease

__all__ = [
    "BLOB_KINDS",
    "NODE_SCHEMA_PARTS",
    "STORE_KINDS",
    "check_kind",
    "fence_chain_store",
    "initialize_blob_store",
    "initialize_peer_stores",
    "initialize_record_index",
    "node_schema",
    "open_blob_store",
    "open_chain_store",
    "open_nonce_store",
    "open_oauth_store",
    "open_record_index",
    "open_sequencer_lease",
    "open_token_store",
]

STORE_KINDS: Final = ("sqlite", "postgres")
#: Every store of a node that has a schema in PostgreSQL (see :func:`node_schema`).
NODE_SCHEMA_PARTS: Final = (
    "chain",
    "records",
    "consortium",
    "blobs",
    "tokens",
    "nonces",
    "oauth",
)
BLOB_KINDS: Final = ("file", "postgres")


def check_kind(kind: str, kinds: tuple[str, ...] = STORE_KINDS, what: str = "store") -> str:
    """``kind`` if it is one of ``kinds``, else :class:`InvalidInput`."""
    if kind not in kinds:
        raise InvalidInput(f"unknown {what} {kind!r}; choose one of {', '.join(kinds)}")
    return kind


def node_schema(institution: str, part: str) -> str:
    """The PostgreSQL schema of one store of one node (``chain``, ``consortium``, ``records``,
    ``blobs``, ``tokens``, ``nonces``).

    Per institution, so several nodes (and each node's copy of the consortium
    chain) can share one database.
    """
    from medledger.storage.postgres.connection import schema_name

    return schema_name(institution, part)


def open_chain_store(
    kind: str, target: str | Path, chain: str, *, schema: str | None = None, create: bool = False
) -> ChainStore:
    """Open (or with ``create=True`` create) the store of ``chain``.

    SQLite: ``target`` is the database file; ``chain`` is recorded on create.
    PostgreSQL: ``target`` is the DSN; ``chain`` must match the stored id.
    """
    if check_kind(kind) == "sqlite":
        from medledger.storage.sqlite.chain import SqliteChainStore

        path = Path(target)
        return SqliteChainStore.create(path, chain) if create else SqliteChainStore.open(path)
    from medledger.storage.postgres.chain import PostgresChainStore

    if create:
        return PostgresChainStore.create(str(target), chain, schema=schema)
    return PostgresChainStore.open(str(target), chain, schema=schema)


def fence_chain_store(store: ChainStore, epoch: int) -> None:
    """Make every append of ``store`` check the sequencer lease's ``epoch`` (PostgreSQL only)."""
    from medledger.storage.postgres.chain import PostgresChainStore

    if not isinstance(store, PostgresChainStore):
        raise InvalidInput("only a PostgreSQL chain store is shared by several hosts")
    store.fence(epoch)


def open_sequencer_lease(kind: str, dsn: str, *, schema: str) -> SequencerLease:
    """The sequencer lease of the chain in ``schema`` (PostgreSQL: several hosts, one writer)."""
    if check_kind(kind) != "postgres":
        raise InvalidInput("the sequencer is elected only through PostgreSQL")
    from medledger.storage.postgres.lease import SequencerLease

    return SequencerLease(dsn, _need(schema))


def initialize_record_index(kind: str, target: str | Path, *, schema: str | None = None) -> None:
    """Create an empty record index (for node creation)."""
    if check_kind(kind) == "sqlite":
        from medledger.storage.sqlite.records import SqliteRecordIndex

        SqliteRecordIndex.initialize(Path(target))
        return
    from medledger.storage.postgres.records import PostgresRecordIndex

    PostgresRecordIndex.initialize(str(target), schema=_need(schema))


def open_record_index(kind: str, target: str | Path, *, schema: str | None = None) -> RecordIndex:
    """Open the record index."""
    if check_kind(kind) == "sqlite":
        from medledger.storage.sqlite.records import SqliteRecordIndex

        return SqliteRecordIndex(Path(target))
    from medledger.storage.postgres.records import PostgresRecordIndex

    return PostgresRecordIndex(str(target), schema=_need(schema))


def initialize_blob_store(kind: str, target: str | Path, *, schema: str | None = None) -> None:
    """Create an empty blob store: a directory (``file``) or a table (``postgres``)."""
    if check_kind(kind, BLOB_KINDS, "blob store") == "file":
        Path(target).mkdir(mode=0o700)
        return
    from medledger.storage.postgres.blobs import PostgresBlobStore

    PostgresBlobStore.initialize(str(target), schema=_need(schema))


def open_blob_store(kind: str, target: str | Path, *, schema: str | None = None) -> BlobStore:
    """Open the blob store."""
    if check_kind(kind, BLOB_KINDS, "blob store") == "file":
        from medledger.storage.blobs import FileBlobStore

        return FileBlobStore(Path(target))
    from medledger.storage.postgres.blobs import PostgresBlobStore

    return PostgresBlobStore(str(target), schema=_need(schema))


def initialize_peer_stores(
    kind: str, target: str | Path, *, tokens: str, nonces: str, oauth: str | None = None
) -> None:
    """Create the API token, peer-nonce and (``oauth``) sign-in stores of a new PostgreSQL
    node (schemas given).

    SQLite files are created on first open; nothing to do for ``"sqlite"``.
    """
    if check_kind(kind) == "sqlite":
        return
    from medledger.storage.postgres.nonces import PostgresNonceStore
    from medledger.storage.postgres.tokens import PostgresTokenStore

    PostgresTokenStore.initialize(str(target), schema=tokens)
    PostgresNonceStore.initialize(str(target), schema=nonces)
    if oauth is not None:
        from medledger.storage.postgres.oauth import PostgresOAuthStore

        PostgresOAuthStore.initialize(str(target), schema=oauth)


def open_token_store(
    kind: str, target: str | Path, *, schema: str | None = None, legacy: Path | None = None
) -> TokenStore:
    """Open the API token store (created on first open).

    SQLite: ``target`` is the file. PostgreSQL: ``target`` is the DSN; the
    tokens of ``legacy`` — the SQLite file a PostgreSQL node kept them in
    before — are imported once (the file is then renamed ``*.imported``), so
    no issued token is lost or silently revived.
    """
    if check_kind(kind) == "sqlite":
        from medledger.storage.sqlite.tokens import SqliteTokenStore

        return SqliteTokenStore(Path(target))
    from medledger.storage.postgres.tokens import PostgresTokenStore

    store = PostgresTokenStore(str(target), schema=_need(schema))
    try:
        if legacy is not None:
            store.import_legacy(legacy)
    except BaseException:
        store.close()
        raise
    return store


def open_nonce_store(
    kind: str, target: str | Path, *, schema: str | None = None, legacy: Path | None = None
) -> NonceStore:
    """Open the peer-request nonce store (created on first open).

    PostgreSQL: the nonces of ``legacy`` (the node's former SQLite file) are
    imported once, so a request seen just before cannot be replayed just after.
    """
    if check_kind(kind) == "sqlite":
        from medledger.storage.sqlite.nonces import SqliteNonceStore

        return SqliteNonceStore(Path(target))
    from medledger.storage.postgres.nonces import PostgresNonceStore

    store = PostgresNonceStore(str(target), schema=_need(schema))
    if legacy is not None:
        try:
            store.import_legacy(legacy)
        except BaseException:
            store.close_now()
            raise
    return store


def open_oauth_store(kind: str, target: str | Path, *, schema: str | None = None) -> OAuthStore:
    """Open the authorization server's store (created on first open): SQLite file or schema."""
    if check_kind(kind) == "sqlite":
        from medledger.storage.sqlite.oauth import SqliteOAuthStore

        return SqliteOAuthStore(Path(target))
    from medledger.storage.postgres.oauth import PostgresOAuthStore

    return PostgresOAuthStore(str(target), schema=_need(schema))


def _need(schema: str | None) -> str:
    if not schema:
        raise InvalidInput("a PostgreSQL store needs a schema name")
    return schema
