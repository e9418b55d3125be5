"""One of a node's stores, opened by itself: no passphrase, none of the node's services.

What administration commands need (``token list``, ``verify``, ``chain
show``, ``oauth-client``): the store the node's configuration names, SQLite
file or PostgreSQL schema. The composition root (:mod:`medledger.node`) opens
the same stores through these functions and re-exports them; they live here so
that opening one store does not import the records service, FHIR validation,
the consortium member and the rest of a running node.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from medledger.config import NodeConfig, NodePaths, StorageConfig, load_config
from medledger.core.errors import InvalidInput, NotFound
from medledger.storage import factory

if TYPE_CHECKING:
    from medledger.core.consortium import Genesis
    from medledger.storage.ports import ChainStore, NonceStore, OAuthStore, TokenStore

__all__ = [
    "load_genesis",
    "open_chain",
    "open_consortium_chain",
    "open_nonce_store",
    "open_oauth_store",
    "open_token_store",
    "store_schema",
    "store_target",
]


def store_target(storage: StorageConfig, path: Path) -> str | Path:
    """Where a store lives: its SQLite file, or the PostgreSQL DSN."""
    return path if storage.store == "sqlite" else storage.dsn


def store_schema(config: NodeConfig, part: str) -> str | None:
    """The PostgreSQL schema of the node's store ``part`` (``chain``, ``tokens``, …); None for SQLite."""
    return (
        factory.node_schema(config.institution, part) if config.storage.store != "sqlite" else None
    )


def open_nonce_store(config: NodeConfig, paths: NodePaths) -> NonceStore:
    """The node's peer-request nonce store: beside its other stores, SQLite or PostgreSQL."""
    sqlite_file = paths.root / "peer_nonces.db"
    return factory.open_nonce_store(
        config.storage.store,
        store_target(config.storage, sqlite_file),
        schema=store_schema(config, "nonces"),
        legacy=sqlite_file if config.storage.store != "sqlite" else None,
    )


def open_token_store(root: Path, config: NodeConfig | None = None) -> TokenStore:
    """The node's API token store: ``tokens.db`` of a SQLite node, a schema of a PostgreSQL one.

    A PostgreSQL node that kept its tokens in ``tokens.db`` before has them
    imported on this first open (see :func:`~medledger.storage.factory.open_token_store`).
    """
    config = config or load_config(root)
    sqlite_file = root / "tokens.db"
    return factory.open_token_store(
        config.storage.store,
        store_target(config.storage, sqlite_file),
        schema=store_schema(config, "tokens"),
        legacy=sqlite_file if config.storage.store != "sqlite" else None,
    )


def open_oauth_store(root: Path, config: NodeConfig | None = None) -> OAuthStore:
    """The node's authorization-server store: ``oauth.db`` of a SQLite node, a schema of a
    PostgreSQL one (created on first open)."""
    config = config or load_config(root)
    return factory.open_oauth_store(
        config.storage.store,
        store_target(config.storage, root / "oauth.db"),
        schema=store_schema(config, "oauth"),
    )


def load_genesis(path: Path) -> Genesis:
    """Read a genesis document (JSON) written by ``medledger consortium init``."""
    from medledger.core.consortium import Genesis  # X.509 member certificates: not for every store

    try:
        return Genesis.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise NotFound(f"no genesis document at {path}; run 'medledger consortium init'") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path}: not a genesis document ({exc})") from None


def open_consortium_chain(root: Path) -> tuple[Genesis, ChainStore]:
    """A node's genesis and its copy of the consortium chain, for reading (no passphrase)."""
    config = load_config(root)
    paths = NodePaths(root=root)
    genesis = load_genesis(paths.genesis)
    target = store_target(config.storage, paths.consortium_db)
    store = factory.open_chain_store(
        config.storage.store, target, genesis.chain_id, schema=store_schema(config, "consortium")
    )
    return genesis, store


def open_chain(root: Path) -> tuple[NodeConfig, ChainStore]:
    """Open a node's chain for reading (no passphrase). Caller closes the store."""
    config = load_config(root)
    target = store_target(config.storage, NodePaths(root=root).chain_db)
    return config, factory.open_chain_store(
        config.storage.store, target, config.chain, schema=store_schema(config, "chain")
    )
