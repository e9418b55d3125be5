"""Composition root: configuration → adapters → ledger. The only place that wires.

``init_node`` creates a node directory (keystore, chain with its genesis
block, ``node.toml``); ``open_node`` unlocks and opens it for writing;
``open_chain`` opens only the chain for reading and verification, which needs
no passphrase.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from medledger.config import NodeConfig, NodePaths, institution_id, load_config
from medledger.core.consortium import ConsortiumParams, Genesis, Member
from medledger.core.errors import Conflict, IntegrityError, InvalidInput, NotFound
from medledger.ledger.anchoring import Anchorer
from medledger.ledger.clock import Clock
from medledger.ledger.consortium import ConsortiumMember
from medledger.ledger.ordering.port import Orderer
from medledger.ledger.private import PrivateChain, SequencerConfig
from medledger.services.keys import InstitutionKeys
from medledger.services.records import RecordsService
from medledger.storage.blobs import FileBlobStore
from medledger.storage.keystore import FileKeyStore, KdfParams, atomic_write
from medledger.storage.records import SqliteRecordIndex
from medledger.storage.sqlite import SqliteChainStore

__all__ = ["Node", "init_node", "load_genesis", "open_chain", "open_node", "write_genesis"]


@dataclass(slots=True)
class Node:
    """An opened institution node."""

    config: NodeConfig
    paths: NodePaths
    keystore: FileKeyStore
    store: SqliteChainStore
    chain: PrivateChain
    index: SqliteRecordIndex
    records: RecordsService
    consortium: ConsortiumMember | None = None
    anchorer: Anchorer | None = None
    _consortium_store: SqliteChainStore | None = None

    async def join_consortium(self, orderer: Orderer, *, anchor: bool = True) -> ConsortiumMember:
        """Start this node's consortium member over ``orderer`` (genesis from genesis.json)."""
        genesis = load_genesis(self.paths.genesis)
        path = self.paths.consortium_db
        store = (
            SqliteChainStore.open(path)
            if path.exists()
            else SqliteChainStore.create(path, genesis.chain_id)
        )
        key = self.keystore.signing_key()
        member = ConsortiumMember(
            genesis=genesis,
            member_id=self.config.institution,
            key=key,
            orderer=orderer,
            store=store,
            evidence_path=self.paths.root / "evidence.jsonl",
        )
        await member.start()
        self.consortium, self._consortium_store = member, store
        if anchor:
            self.anchorer = Anchorer(
                institution=self.config.institution, chain=self.chain, member=member, key=key
            )
            self.anchorer.start()
        return member

    async def close(self) -> None:
        """Commit everything queued, then release storage."""
        if self.anchorer is not None:
            await self.anchorer.close()
        await self.records.close()
        await self.chain.close()
        if self.consortium is not None:
            await self.consortium.close()
        await self.index.close()
        self.store.close()
        if self._consortium_store is not None:
            self._consortium_store.close()


def load_genesis(path: Path) -> Genesis:
    """Read a genesis document (JSON) written by ``medledger consortium init``."""
    try:
        return Genesis.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise NotFound(f"no genesis document at {path}; run 'medledger consortium init'") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path}: not a genesis document ({exc})") from None


def write_genesis(
    consortium: str, roots: list[Path], *, time_ms: int, params: ConsortiumParams | None = None
) -> Genesis:
    """A genesis of the nodes in ``roots``, copied into each node directory."""
    members = []
    for root in roots:
        config = load_config(root)
        members.append(
            Member(id=config.institution, name=config.name, signing_key=config.signing_key)
        )
    genesis = Genesis(
        consortium=consortium,
        time_ms=time_ms,
        members=tuple(members),
        params=params or ConsortiumParams(),
    )
    data = (json.dumps(genesis.to_json(), indent=2) + "\n").encode()
    for root in roots:
        atomic_write(NodePaths(root=root).genesis, data, mode=0o644)
    return genesis


def init_node(
    root: Path,
    *,
    name: str,
    passphrase: bytes,
    institution: str | None = None,
    sequencer: SequencerConfig | None = None,
    kdf: KdfParams | None = None,
    clock: Clock | None = None,
) -> NodeConfig:
    """Create a new node in ``root`` (absent or empty). Leaves nothing behind on failure."""
    if not name.strip():
        raise InvalidInput("the institution name must not be empty")
    inst = institution_id(institution or name)
    if institution is not None and inst != institution:
        raise InvalidInput(
            f"institution id {institution!r} must be lowercase letters, digits and dashes"
        )
    created_root = not root.exists()
    if not created_root and (not root.is_dir() or any(root.iterdir())):
        raise Conflict(f"{root} exists and is not an empty directory")
    paths = NodePaths(root=root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        keystore = FileKeyStore.create(paths.keystore, passphrase, params=kdf)
        key = keystore.signing_key()
        chain_id = f"private:{inst}"
        store = SqliteChainStore.create(paths.chain_db, chain_id)
        try:
            PrivateChain.create(
                store, key, chain_id=chain_id, institution=inst, name=name, clock=clock
            )
        finally:
            store.close()
        paths.blobs.mkdir()
        SqliteRecordIndex.initialize(paths.records_db)
        config = NodeConfig(
            name=name,
            institution=inst,
            chain=chain_id,
            sequencer=sequencer or SequencerConfig(),
            signing_key=key.public,
        )
        config.save(paths.config)
    except BaseException:
        if created_root:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for child in root.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise
    return config


def open_chain(root: Path) -> tuple[NodeConfig, SqliteChainStore]:
    """Open a node's chain for reading (no passphrase). Caller closes the store."""
    config = load_config(root)
    return config, SqliteChainStore.open(NodePaths(root=root).chain_db)


def open_node(root: Path, passphrase: bytes, *, clock: Clock | None = None) -> Node:
    """Unlock the keystore and open the chain for writing."""
    config = load_config(root)
    paths = NodePaths(root=root)
    keystore = FileKeyStore.open(paths.keystore, passphrase)
    key = keystore.signing_key()
    if key.public != config.signing_key:
        raise IntegrityError("the keystore's signing key is not the one in node.toml")
    store = SqliteChainStore.open(paths.chain_db)
    try:
        chain = PrivateChain(
            store, key, proposer=config.institution, config=config.sequencer, clock=clock
        )
        index = SqliteRecordIndex(paths.records_db)
    except BaseException:
        store.close()
        raise
    records = RecordsService(
        institution=config.institution,
        chain=chain,
        index=index,
        blobs=FileBlobStore(paths.blobs),
        keys=InstitutionKeys(keystore),
        clock=clock,
    )
    return Node(
        config=config,
        paths=paths,
        keystore=keystore,
        store=store,
        chain=chain,
        index=index,
        records=records,
    )
