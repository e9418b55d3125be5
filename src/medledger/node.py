"""Composition root: configuration → adapters → ledger. The only place that wires.

``init_node`` creates a node directory (keystore, chain with its genesis
block, ``node.toml``); ``open_node`` unlocks and opens it for writing;
``open_chain`` opens only the chain for reading and verification, which needs
no passphrase (it and the other single-store openers live in
:mod:`medledger.stores`, re-exported here).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from medledger.config import (
    CONFIG_FILE,
    NodeConfig,
    NodePaths,
    StorageConfig,
    institution_id,
    load_config,
    parse_advertise,
)
from medledger.core.consortium import ConsortiumParams, Genesis, Member, MemberSet
from medledger.core.errors import Conflict, IntegrityError, InvalidInput, NotFound, StorageError
from medledger.core.passphrase import check_new_passphrase
from medledger.core.tls import MemberCertificate
from medledger.ledger.anchoring import Anchorer
from medledger.ledger.clock import Clock, SystemClock
from medledger.ledger.consortium.followed import StoredMembership
from medledger.ledger.consortium.member import ConsortiumMember
from medledger.ledger.consortium.rules import AnchorRecord
from medledger.ledger.integrity import check_private_store, last_anchor
from medledger.ledger.ordering.port import Orderer
from medledger.ledger.private import PrivateChain, SequencerConfig
from medledger.ledger.supervision import Health
from medledger.services.access import AccessLog
from medledger.services.bulk_export import DEFAULT_TTL_S as DEFAULT_EXPORT_TTL_S
from medledger.services.bulk_export import BulkExports
from medledger.services.conditional import ConditionalWrites
from medledger.services.enrollment import EnrollmentService
from medledger.services.health import DEFAULT_MIN_FREE_BYTES, StoreHealth
from medledger.services.hpke import DEFAULT_KEM, HpkeKeyPair
from medledger.services.keys import InstitutionKeys
from medledger.services.records.service import RecordsService
from medledger.services.sequencer_link import SOCKET_NAME as SEQUENCER_SOCKET
from medledger.services.sequencer_link import Dial, SequencerClient
from medledger.services.sharing import SharingService
from medledger.services.store_check import StoreReport, StoreScrub, check_store, settle_writes
from medledger.services.tls import (
    DEFAULT_HOSTS,
    LiveServerTls,
    client_context,
    file_version,
    load_certificate,
    pem_bundle,
    promote_renewed,
    write_certificate,
)
from medledger.services.trail import TrailIndex
from medledger.services.validation import Validator
from medledger.storage import factory
from medledger.storage.keystore import FileKeyStore, KdfParams, atomic_write
from medledger.storage.ports import (
    BlobStore,
    ChainStore,
    NonceStore,
    RecordIndex,
)
from medledger.stores import (
    load_genesis,
    open_chain,
    open_consortium_chain,
    open_nonce_store,
    open_oauth_store,
    open_token_store,
    store_schema,
    store_target,
)

if TYPE_CHECKING:
    from medledger.services.peer_http import HttpPeerTransport

__all__ = [
    "STORE_HEALTH_CHECKS",
    "Node",
    "init_node",
    "load_genesis",
    "member_entry",
    "open_chain",
    "open_consortium_chain",
    "open_node",
    "open_nonce_store",
    "open_orderer",
    "open_oauth_store",
    "open_token_store",
    "open_worker_node",
    "own_last_anchor",
    "save_genesis",
    "export_ttl",
    "scrub_settings",
    "write_genesis",
]


#: The names of the store's checks in ``Node.health``: disk space, damage the scrub found.
STORE_HEALTH_CHECKS = ("disk", "record-store")


@dataclass(slots=True)
class Node:
    """An opened institution node.

    ``health`` holds a named check for every background task the node runs
    (private-chain sequencer, consortium consume loop and cut timer,
    anchoring, access summaries); ``/readyz`` reports the failing ones.
    """

    config: NodeConfig
    paths: NodePaths
    keystore: FileKeyStore
    store: ChainStore
    #: The private chain; in an API worker, the link to the sequencer that writes it.
    chain: PrivateChain | SequencerClient
    index: RecordIndex
    records: RecordsService
    access: AccessLog
    enrollments: EnrollmentService
    consortium: ConsortiumMember | None = None
    anchorer: Anchorer | None = None
    sharing: SharingService | None = None
    _consortium_store: ChainStore | None = None
    _blobs: BlobStore | None = None
    _nonces: NonceStore | None = None
    _transport: HttpPeerTransport | None = None
    _trail: TrailIndex | None = None
    _keys: InstitutionKeys | None = None
    _scrub: StoreScrub | None = None
    #: The live HTTPS context, once :meth:`server_tls_context` made it.
    server_tls: LiveServerTls | None = None
    #: The NATS client's context (JetStream over TLS), once :meth:`nats_tls_context` made it.
    nats_tls: ssl.SSLContext | None = None
    _nats_trusted: set[str] = field(default_factory=set)
    _genesis_anchors: tuple[object, tuple[MemberCertificate, ...]] | None = None
    #: An API worker's view of the members: the stored consortium chain it follows.
    _stored_members: StoredMembership | None = None
    #: Bulk export jobs, once :meth:`start_exports` ran (the API answers 503 before).
    exports: BulkExports | None = None
    health: Health = field(default_factory=Health)
    #: The node's time: everything it does that needs "now" asks this (tests inject theirs).
    clock: Clock = field(default_factory=SystemClock)
    #: Conditional creates, updates and deletes: search and write as one step per type.
    conditional: ConditionalWrites = field(init=False)

    def __post_init__(self) -> None:
        self.conditional = self.records.conditional
        self.health.add("private-chain-store", self._chain_store_problem)
        self.health.add("private-sequencer", self.chain.problem)
        self.health.add("access-summaries", lambda: self.access.problem())
        disk, damage = STORE_HEALTH_CHECKS
        self.health.add(disk, self.store_health.space_problem)
        self.health.add(damage, self.store_health.damage_problem)
        self.health.add("search-reindex", lambda: self.records.reindexer.failure)

    @property
    def writer_chain(self) -> PrivateChain:
        """The private chain this process writes: not in an API worker (its sequencer does)."""
        if not isinstance(self.chain, PrivateChain):
            raise InvalidInput("an API worker process does not write the chain itself")
        return self.chain

    @property
    def store_health(self) -> StoreHealth:
        """The store's health: disk space, failed writes, damage found (for /readyz, /metrics)."""
        return self.records.health

    def _institution_keys(self) -> InstitutionKeys:
        if self._keys is None:
            self._keys = InstitutionKeys(self.keystore)
        return self._keys

    def _blob_store(self) -> BlobStore:
        assert self._blobs is not None, "a node opened by open_node has a blob store"
        return self._blobs

    def check_records(self) -> StoreReport:
        """``verify --records``: every index row, blob and wrapped key against the chain.

        Blocking (reads the whole store): call it off the event loop in a server.
        """
        return check_store(
            institution=self.config.institution,
            index=self.index,
            blobs=self._blob_store(),
            chain=self.store,
            keys=self._institution_keys(),
            settle=settle_writes(self.records.writing),
        )

    def start_store_scrub(self, *, interval_s: float, rows_per_s: float) -> StoreScrub:
        """Run the store check in the background every ``interval_s`` (see ``StoreScrub``)."""
        if self._scrub is None:
            self._scrub = StoreScrub(
                institution=self.config.institution,
                index=self.index,
                blobs=self._blob_store(),
                chain=self.store,
                keys=self._institution_keys(),
                health=self.store_health,
                interval_s=interval_s,
                rows_per_s=rows_per_s,
                writing=self.records.writing,
                recovered=self.records.ensure_recovered,
            )
            self._scrub.start()
        return self._scrub

    def _chain_store_problem(self) -> str | None:
        # Unauthenticated /readyz shows this: no paths, and the repair pointer.
        if self.store.damage() is None:
            return None
        return "the private chain store reported corruption; see docs/reliability.md, 'Repair'"

    @property
    def consortium_store(self) -> ChainStore | None:
        """This node's copy of the final consortium chain, once joined."""
        return self._consortium_store

    def trail_index(self) -> TrailIndex:
        """The patient-trail index over this node's chains (built on first use)."""
        if self._trail is None:
            stores = [self.store]
            if self._consortium_store is not None:
                stores.append(self._consortium_store)
            self._trail = TrailIndex(stores)
        return self._trail

    async def join_consortium(self, orderer: Orderer, *, anchor: bool = True) -> ConsortiumMember:
        """Start this node's consortium member over ``orderer`` (genesis from genesis.json)."""
        genesis = load_genesis(self.paths.genesis)
        store = _consortium_store(self.config, self.paths, genesis.chain_id)
        key = self.keystore.signing_key()
        try:
            # Refuses a stored chain of another genesis: the store must not stay open then.
            member = ConsortiumMember(
                genesis=genesis,
                member_id=self.config.institution,
                key=key,
                orderer=orderer,
                store=store,
                evidence_path=self.paths.root / "evidence.jsonl",
            )
        except BaseException:
            store.close()
            raise
        try:
            await member.start()
        except BaseException:
            await member.close()
            store.close()
            raise
        for task in member.tasks:
            self.health.watch(task)
        member.on_members_changed = self._members_changed
        self.consortium, self._consortium_store = member, store
        self._members_changed(member.state.members)
        self.enrollments.attach_consortium(member)
        self._trail = None  # rebuilt over both chains on next use
        self.access = AccessLog(
            institution=self.config.institution, chain=self.writer_chain, member=member
        )
        self._nonces = open_nonce_store(self.config, self.paths)
        # Here, not at the top: commands that only read a chain need no HTTP client.
        from medledger.services.peer_http import HttpPeerTransport

        self._transport = HttpPeerTransport(
            client_cert=self.paths.tls_cert if self.paths.tls_cert.exists() else None,
            client_key=self.paths.tls_key,
            before_request=self.promote_renewed_certificate,
        )
        kem = self.config.hpke_key.partition(":")[0] or DEFAULT_KEM
        self.sharing = SharingService(
            institution=self.config.institution,
            key=key,
            hpke=HpkeKeyPair.from_keystore(self.keystore, kem),
            records=self.records,
            chain=self.writer_chain,
            member=member,
            consortium_store=store,
            access=self.access,
            nonces=self._nonces,
            enrollments=self.enrollments,
            transport=self._transport,
        )
        if anchor:
            self.start_anchoring()
        return member

    def tls_anchors(self) -> tuple[MemberCertificate, ...]:
        """The current members' pinned TLS certificates (the genesis's before joining)."""
        if self.consortium is not None:
            return self.consortium.state.members.tls_certificates()
        if self._stored_members is not None:
            # An API worker: the parent's member stores the final chain; a member the
            # consortium removed is no longer trusted here either (decision 0035).
            return self._stored_members.members().tls_certificates()
        try:
            version = file_version(self.paths.genesis)
        except FileNotFoundError:
            return ()
        # Asked at every handshake: the genesis is read and its certificates checked
        # once per version of the file, not each time.
        if self._genesis_anchors is None or self._genesis_anchors[0] != version:
            anchors = MemberSet(load_genesis(self.paths.genesis).members).tls_certificates()
            self._genesis_anchors = (version, anchors)
        return self._genesis_anchors[1]

    def promote_renewed_certificate(self) -> bool:
        """Start using a renewed TLS certificate once the consortium pins it (see
        ``services.tls.promote_renewed``); checked before each handshake and peer request."""
        own = None
        if self.consortium is not None:
            own = self.consortium.state.members.by_id(self.config.institution)
        paths = self.paths
        return promote_renewed(
            paths.tls_cert,
            paths.tls_key,
            paths.tls_next_cert,
            paths.tls_next_key,
            own.tls_cert if own is not None else None,
        )

    def nats_tls_context(self) -> ssl.SSLContext:
        """The context the NATS client trusts the servers with: every member's certificate.

        Built from the genesis, then extended as final membership changes pin new
        certificates (a member's renewed one included), so a reconnection to a
        NATS server that renewed its certificate succeeds without a restart. An
        ``ssl`` trust store only grows: a removed member's certificate stays
        trusted *as a NATS server* until the node restarts (its NKey is what
        the servers' authorization drops).
        """
        if self.nats_tls is None:
            certs = MemberSet(load_genesis(self.paths.genesis).members).tls_certificates()
            self.nats_tls = client_context(certs)
            self._nats_trusted = {cert.fingerprint for cert in certs}
            if self.consortium is not None:
                self._members_changed(self.consortium.state.members)
        return self.nats_tls

    def _members_changed(self, members: MemberSet) -> None:
        """A final membership change: start using a renewed certificate, trust new ones."""
        self.promote_renewed_certificate()
        if self.nats_tls is not None:
            new = [c for c in members.tls_certificates() if c.fingerprint not in self._nats_trusted]
            if new:
                self.nats_tls.load_verify_locations(cadata=pem_bundle(new))
                self._nats_trusted.update(c.fingerprint for c in new)

    def _live_tls_anchors(self) -> tuple[MemberCertificate, ...]:
        self.promote_renewed_certificate()
        return self.tls_anchors()

    def server_tls_context(self) -> ssl.SSLContext:
        """The HTTPS context of this node's API: its own certificate; member clients verified.

        Live (``services.tls.LiveServerTls``, kept as :attr:`server_tls`): each new
        handshake uses the certificate in ``tls.crt`` now and trusts the members
        of the consortium state now, so renewing the certificate or a final
        membership change needs no restart. Raises :class:`NotFound` if the node
        has no TLS certificate (``node tls-cert``).
        """
        self.promote_renewed_certificate()  # also finishes one a crash interrupted
        if not self.paths.tls_cert.exists():
            raise NotFound(
                f"{self.paths.root} has no TLS certificate (tls.crt); create one with"
                " 'medledger node tls-cert', or serve plain HTTP on loopback with --plain-http"
            )
        self.server_tls = LiveServerTls(
            self.paths.tls_cert, self.paths.tls_key, self._live_tls_anchors
        )
        return self.server_tls.context

    def client_tls_context(self, member_cert: MemberCertificate) -> ssl.SSLContext:
        """A client context that trusts ``member_cert`` alone and presents this node's."""
        return client_context(
            [member_cert], cert_path=self.paths.tls_cert, key_path=self.paths.tls_key
        )

    def start_anchoring(self, *, when: Callable[[], bool] | None = None) -> Anchorer:
        """Anchor the private chain on the consortium in a supervised background task.

        ``when``: start only once this says so (e.g. once the member caught up).
        """
        if self.consortium is None:
            raise InvalidInput("anchoring needs a consortium member: join the consortium first")
        self.anchorer = Anchorer(
            institution=self.config.institution,
            chain=self.writer_chain,
            member=self.consortium,
            key=self.keystore.signing_key(),
            when=when,
        )
        self.health.watch(self.anchorer.task)
        self.anchorer.start()
        return self.anchorer

    async def start_exports(self, *, ttl_s: float, sweep_interval_s: float = 60.0) -> BulkExports:
        """Open the bulk export jobs (resuming unfinished ones, removing expired ones) and
        start their worker and expiry sweep as supervised tasks."""
        if self.exports is None:
            exports = BulkExports(
                root=self.paths.exports,
                institution=self.config.institution,
                records=self.records,
                keys=self._institution_keys(),
                access=self.access,
                clock=self.clock,
                ttl_ms=int(ttl_s * 1000),
                sweep_interval_s=sweep_interval_s,
            )
            await exports.start(self.health)
            self.exports = exports
        return self.exports

    async def close(self) -> None:
        """Commit everything queued, then release storage (:meth:`stop`, :meth:`close_stores`)."""
        await self.stop()
        await self.close_stores()

    async def stop(self) -> None:
        """Stop the background tasks and commit everything queued; storage stays open.

        After this nothing reads from the consortium's ordering service any more,
        so the caller may close that before :meth:`close_stores`.
        """
        if self._scrub is not None:
            await self._scrub.close()
        if self.exports is not None:
            await self.exports.close()
        if self.anchorer is not None:
            await self.anchorer.close()
        await self.access.drain()
        if self._transport is not None:
            await self._transport.close()
        await self.records.close()
        await self.chain.close()
        if self.consortium is not None:
            await self.consortium.close()

    async def close_stores(self) -> None:
        """Release storage; call after :meth:`stop` (the writes it committed are durable)."""
        if self._nonces is not None:
            await self._nonces.close()
        await self.index.close()
        self.store.close()
        if self._consortium_store is not None:
            self._consortium_store.close()
        if self._stored_members is not None:
            self._stored_members.close()
        close_blobs = getattr(self._blobs, "close", None)
        if close_blobs is not None:
            close_blobs()


def _consortium_store(config: NodeConfig, paths: NodePaths, chain_id: str) -> ChainStore:
    target = store_target(config.storage, paths.consortium_db)
    schema = store_schema(config, "consortium")
    try:
        return factory.open_chain_store(config.storage.store, target, chain_id, schema=schema)
    except NotFound:
        return factory.open_chain_store(
            config.storage.store, target, chain_id, schema=schema, create=True
        )


def _validation_workers(explicit: int | None) -> int:
    """Processes for FHIR validation: the argument, else MEDLEDGER_VALIDATION_WORKERS, else 0."""
    if explicit is not None:
        return explicit
    text = os.environ.get("MEDLEDGER_VALIDATION_WORKERS", "0")
    if not text.isdigit():
        raise InvalidInput("MEDLEDGER_VALIDATION_WORKERS must be a whole number")
    return int(text)


#: Seconds between store scrub passes (``0`` turns the scrub off).
SCRUB_INTERVAL_ENV = "MEDLEDGER_SCRUB_INTERVAL_S"
#: Record versions the scrub checks per second at most.
SCRUB_RATE_ENV = "MEDLEDGER_SCRUB_RATE"
#: Free bytes below which the node reports its data directory's disk as full.
MIN_FREE_ENV = "MEDLEDGER_MIN_FREE_BYTES"


def _env_number(name: str, default: float) -> float:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise InvalidInput(f"{name} must be a number, not {text!r}") from None
    if not value >= 0:  # also refuses NaN
        raise InvalidInput(f"{name} must not be negative")
    return value


#: Seconds a finished bulk export's files are kept when not all were downloaded.
EXPORT_TTL_ENV = "MEDLEDGER_EXPORT_TTL_S"


def export_ttl() -> float:
    """Seconds a finished bulk export is kept (``MEDLEDGER_EXPORT_TTL_S``, default 1 h)."""
    return _env_number(EXPORT_TTL_ENV, DEFAULT_EXPORT_TTL_S)


def scrub_settings() -> tuple[float, float]:
    """``(interval seconds, versions per second)`` of the store scrub, from the environment.

    Defaults: a pass every hour at up to 500 versions a second.
    """
    interval = _env_number(SCRUB_INTERVAL_ENV, 3600.0)
    rate = _env_number(SCRUB_RATE_ENV, 500.0)
    if interval > 0 and rate == 0:
        raise InvalidInput(f"{SCRUB_RATE_ENV} must be positive")
    return interval, rate


def member_entry(root: Path) -> Member:
    """The node in ``root`` as a genesis member: public keys, advertised URL, TLS certificate."""
    config = load_config(root)
    cert_path = NodePaths(root=root).tls_cert
    return Member(
        id=config.institution,
        name=config.name,
        signing_key=config.signing_key,
        hpke_key=config.hpke_key,
        peer_url=config.advertise,
        tls_cert=load_certificate(cert_path) if cert_path.exists() else None,
    )


def write_genesis(
    consortium: str,
    roots: list[Path],
    *,
    time_ms: int,
    params: ConsortiumParams | None = None,
    peer_urls: Mapping[str, str] | None = None,
) -> Genesis:
    """A genesis of the nodes in ``roots``, copied into each node directory.

    ``peer_urls`` maps an institution id to the URL other members reach its node at;
    a node not named there is reached at the address it advertises (``node init
    --advertise``), if any.
    """
    peer_urls = peer_urls or {}
    members = []
    for root in roots:
        member = member_entry(root)
        if member.id in peer_urls:
            member = replace(member, peer_url=peer_urls[member.id])
        members.append(member)
    genesis = Genesis(
        consortium=consortium,
        time_ms=time_ms,
        members=tuple(members),
        params=params or ConsortiumParams(),
    )
    for root in roots:
        save_genesis(genesis, NodePaths(root=root).genesis)
    return genesis


def save_genesis(genesis: Genesis, path: Path) -> None:
    """Write ``genesis`` as the JSON document nodes read (atomically, owner-only)."""
    atomic_write(path, (json.dumps(genesis.to_json(), indent=2) + "\n").encode(), mode=0o600)


def _make_private(root: Path) -> None:
    """Make the node directory owner-only (0700), whatever it was created with.

    The databases, WAL files, blobs, logs and tokens inside are created
    owner-only too (the CLI's umask, explicit modes), but a directory that
    others cannot enter also covers files an older version or another tool
    left group- or world-readable.
    """
    mode = root.stat().st_mode & 0o777
    if mode & 0o077:
        root.chmod(0o700)
        logging.getLogger(__name__).warning(
            "node directory was open to other users; made it owner-only",
            extra={"fields": {"was": oct(mode)}},
        )


def init_node(
    root: Path,
    *,
    name: str,
    passphrase: bytes,
    institution: str | None = None,
    sequencer: SequencerConfig | None = None,
    kdf: KdfParams | None = None,
    clock: Clock | None = None,
    storage: StorageConfig | None = None,
    hpke_kem: str = DEFAULT_KEM,
    tls_hosts: Sequence[str] = DEFAULT_HOSTS,
    advertise: str = "",
) -> NodeConfig:
    """Create a new node in ``root`` (absent or empty). Leaves nothing behind on failure.

    ``hpke_kem`` picks the KEM whose public key the node publishes for sharing
    (``MLKEM768_X25519``, the post-quantum hybrid, or ``X25519``). ``tls_hosts``
    are the names and addresses others reach the node at: its self-signed TLS
    certificate (``tls.crt``, key ``tls.key``; ``services.tls``) names them.
    ``advertise`` (``https://HOST:PORT``, see ``config.parse_advertise``) is the
    URL other members reach the node at: it goes into ``node.toml``, into the
    genesis as the member's ``peer_url``, and its host into the certificate.

    ``storage`` defaults to ``[storage]`` from the environment (``MEDLEDGER_STORE``,
    ``MEDLEDGER_DSN``, ``MEDLEDGER_BLOBS``), which defaults to SQLite and files.
    PostgreSQL schemas are per institution and must not exist yet.
    """
    storage = storage if storage is not None else StorageConfig.from_env()
    if advertise:
        advertised_host = parse_advertise(advertise)[1]
        if advertised_host not in tls_hosts:
            # Clients check the host name against the certificate: it must name this one.
            tls_hosts = (advertised_host, *tls_hosts)
    check_new_passphrase(passphrase, what="keystore passphrase")
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
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        _make_private(root)
        keystore = FileKeyStore.create(paths.keystore, passphrase, params=kdf)
        key = keystore.signing_key()
        chain_id = f"private:{inst}"
        schema = factory.node_schema(inst, "chain") if storage.store != "sqlite" else None
        store = factory.open_chain_store(
            storage.store,
            store_target(storage, paths.chain_db),
            chain_id,
            schema=schema,
            create=True,
        )
        try:
            PrivateChain.create(
                store, key, chain_id=chain_id, institution=inst, name=name, clock=clock
            )
        finally:
            store.close()
        config = NodeConfig(
            name=name,
            institution=inst,
            chain=chain_id,
            sequencer=sequencer or SequencerConfig(),
            signing_key=key.public,
            storage=storage,
            hpke_key=HpkeKeyPair.from_keystore(keystore, hpke_kem).public_text(),
            advertise=advertise,
        )
        factory.initialize_blob_store(
            storage.blobs,
            paths.blobs if storage.blobs == "file" else storage.dsn,
            schema=factory.node_schema(inst, "blobs") if storage.blobs != "file" else None,
        )
        factory.initialize_record_index(
            storage.store,
            store_target(storage, paths.records_db),
            schema=store_schema(config, "records"),
        )
        if storage.store != "sqlite":
            factory.initialize_peer_stores(
                storage.store,
                storage.dsn,
                tokens=factory.node_schema(inst, "tokens"),
                nonces=factory.node_schema(inst, "nonces"),
                oauth=factory.node_schema(inst, "oauth"),
            )
        write_certificate(
            paths.tls_cert,
            paths.tls_key,
            inst,
            tls_hosts,
            now_ms=(clock or SystemClock()).now_ms(),
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


async def open_orderer(
    config: NodeConfig, root: Path, *, tls: ssl.SSLContext | None = None
) -> Orderer:
    """The ordering service named by ``[consortium]`` (the caller closes it).

    ``solo``: the order file shared by the nodes of this machine; ``jetstream``:
    a connection to the NATS cluster (the stream is created if absent). With
    an NKey seed it connects over TLS: with ``tls`` (a running node's
    ``Node.nats_tls_context``), else trusting the genesis members' certificates.
    """
    settings = config.consortium
    if settings is None:
        raise InvalidInput(f"{CONFIG_FILE} has no [consortium] section (or MEDLEDGER_ORDERING)")
    if settings.ordering == "solo":
        from medledger.ledger.ordering.solo import SoloOrderer

        return SoloOrderer(settings.order_path(root))
    from medledger.ledger.ordering.jetstream import JetStreamOrderer, JetStreamTuning

    seed = None
    if not settings.nats_seed:
        tls = None
    else:
        if tls is None:
            # The servers are members' (any member's): trust the members' pinned certificates.
            members = load_genesis(NodePaths(root=root).genesis).members
            tls = client_context(MemberSet(members).tls_certificates())
        seed = Path(settings.nats_seed)
        seed = seed if seed.is_absolute() else root / seed
    return await JetStreamOrderer.connect(
        list(settings.nats_urls),
        stream=settings.stream,
        subject=settings.subject,
        replicas=settings.replicas,
        name=f"medledger-{config.institution}",
        tuning=JetStreamTuning(
            ping_interval=settings.nats_ping_interval,
            max_outstanding_pings=settings.nats_max_outstanding_pings,
        ),
        tls=tls,
        nkeys_seed=seed,
    )


def own_last_anchor(config: NodeConfig, paths: NodePaths) -> AnchorRecord | None:
    """The node's own newest anchor in its copy of the final consortium chain, if any."""
    if not paths.genesis.exists():
        return None
    genesis = load_genesis(paths.genesis)
    target = store_target(config.storage, paths.consortium_db)
    if config.storage.store == "sqlite" and not paths.consortium_db.exists():
        return None
    try:
        store = factory.open_chain_store(
            config.storage.store,
            target,
            genesis.chain_id,
            schema=store_schema(config, "consortium"),
        )
    except NotFound:
        return None  # never joined: nothing anchored here
    try:
        return last_anchor(store, config.institution)
    finally:
        store.close()


def _close_unused(index: RecordIndex) -> None:
    """Close an index nothing was written to (outside any event loop's schedule).

    Its group committer never started, so ``close`` completes without suspending.
    """
    closing = index.close()
    try:
        closing.send(None)
    except StopIteration:
        return
    closing.close()
    raise StorageError("the record index could not be closed")


def _open_node_keys(root: Path, passphrase: bytes) -> tuple[NodeConfig, NodePaths, FileKeyStore]:
    """The node's configuration and unlocked keystore, whose signing key must be node.toml's."""
    config = load_config(root)
    paths = NodePaths(root=root)
    keystore = FileKeyStore.open(paths.keystore, passphrase)
    if keystore.signing_key().public != config.signing_key:
        raise IntegrityError("the keystore's signing key is not the one in node.toml")
    return config, paths, keystore


def _open_chain_and_index(config: NodeConfig, paths: NodePaths) -> tuple[ChainStore, RecordIndex]:
    """The private chain's store and the record index (the store closed if the index fails)."""
    storage = config.storage
    store = factory.open_chain_store(
        storage.store,
        store_target(storage, paths.chain_db),
        config.chain,
        schema=store_schema(config, "chain"),
    )
    try:
        index = factory.open_record_index(
            storage.store,
            store_target(storage, paths.records_db),
            schema=store_schema(config, "records"),
        )
    except BaseException:
        store.close()
        raise
    return store, index


def _open_blob_store(config: NodeConfig, paths: NodePaths) -> BlobStore:
    """The node's blob store: files under the node directory, or its database schema."""
    storage = config.storage
    if storage.blobs == "file":
        return factory.open_blob_store(storage.blobs, paths.blobs, schema=None)
    return factory.open_blob_store(
        storage.blobs, storage.dsn, schema=factory.node_schema(config.institution, "blobs")
    )


def _store_health(root: Path, blobs: str) -> StoreHealth:
    """Free-space watch of the node's disk (only where its blobs are files)."""
    return StoreHealth(
        root if blobs == "file" else None,
        min_free_bytes=int(_env_number(MIN_FREE_ENV, DEFAULT_MIN_FREE_BYTES)),
    )


def open_node(
    root: Path,
    passphrase: bytes,
    *,
    clock: Clock | None = None,
    validation_workers: int | None = None,
    full_check: bool = False,
    fence_epoch: int | None = None,
) -> Node:
    """Unlock the keystore, check the stores, and open the chain for writing.

    ``fence_epoch``: the sequencer lease this process holds (PostgreSQL,
    ``storage.postgres.lease``); every block append then checks it in its own
    transaction, so this process appends nothing once another one took over.

    ``validation_workers``: processes that validate FHIR input beside the event
    loop (default: ``MEDLEDGER_VALIDATION_WORKERS`` or 0, i.e. inline).

    Before anything can write, the chain store passes the start-up check of
    :func:`medledger.ledger.integrity.check_private_store` (``full_check``:
    every block, not only the newest): backend structure, not behind what the
    record index saw durable, newest blocks intact, and holding what the
    node's own last final anchor published. Otherwise :class:`DamagedStore`
    is raised and nothing is changed.
    """
    clock = clock if clock is not None else SystemClock()
    config, paths, keystore = _open_node_keys(root, passphrase)
    key = keystore.signing_key()
    _make_private(root)
    store, index = _open_chain_and_index(config, paths)
    try:
        if fence_epoch is not None:
            factory.fence_chain_store(store, fence_epoch)
        check_private_store(
            store,
            key=key.public,
            indexed_height=index.max_chain_base(),
            anchor=own_last_anchor(config, paths),
            full=full_check,
        )
        chain = PrivateChain(
            store, key, proposer=config.institution, config=config.sequencer, clock=clock
        )
        blobs = _open_blob_store(config, paths)
    except BaseException:
        store.close()
        _close_unused(index)
        raise
    return _assemble(
        config,
        paths,
        keystore,
        store,
        index,
        blobs,
        chain,
        clock,
        validator=Validator(_validation_workers(validation_workers)),
    )


def open_worker_node(
    root: Path,
    passphrase: bytes,
    *,
    on_stale_keys: Callable[[], None] = lambda: None,
    clock: Clock | None = None,
    dial: Dial | None = None,
) -> Node:
    """The node as an API worker process serves it (``node start --workers N``, N > 1).

    Reads come straight from the stores the sequencer (the parent process,
    opened by :func:`open_node`) writes; every chain transaction and record
    commit goes to it over ``services.sequencer_link``. The worker runs no
    start-up check and no crash recovery (the sequencer did both before any
    worker started) and writes neither the chain nor the record index.
    ``on_stale_keys``: called when the sequencer refused a version sealed under
    a key-encryption key rotated since this process opened the keystore.
    ``dial``: how to reach the sequencer when it is not the parent process (a
    standby host: the active host's link over mutual TLS); default its Unix socket.
    """
    clock = clock if clock is not None else SystemClock()
    config, paths, keystore = _open_node_keys(root, passphrase)
    store, index = _open_chain_and_index(config, paths)
    try:
        blobs = _open_blob_store(config, paths)
    except BaseException:
        store.close()
        _close_unused(index)
        raise
    chain = SequencerClient(
        paths.root / SEQUENCER_SOCKET,
        chain_id=config.chain,
        store=store,
        clock_ms=clock.now_ms,
        on_stale_keys=on_stale_keys,
        dial=dial,
    )
    return _assemble(
        config,
        paths,
        keystore,
        store,
        index,
        blobs,
        chain,
        clock,
        validator=Validator(0),
        # The sequencer stamps chain_base and alone recovers (see RecordWriter.commit_sealed).
        crash_recovery=False,
        remote=chain,
        stored_members=_stored_membership(config, paths),
    )


def _assemble(
    config: NodeConfig,
    paths: NodePaths,
    keystore: FileKeyStore,
    store: ChainStore,
    index: RecordIndex,
    blobs: BlobStore,
    chain: PrivateChain | SequencerClient,
    clock: Clock,
    *,
    validator: Validator,
    crash_recovery: bool = True,
    remote: SequencerClient | None = None,
    stored_members: StoredMembership | None = None,
) -> Node:
    """The node's services over its opened stores, writing through ``chain`` (the
    chain itself in the sequencer, the link to it in an API worker)."""
    keys = InstitutionKeys(keystore)
    records = RecordsService(
        institution=config.institution,
        chain=chain,
        index=index,
        blobs=blobs,
        keys=keys,
        clock=clock,
        validator=validator,
        crash_recovery=crash_recovery,
        health=_store_health(paths.root, config.storage.blobs),
        remote=remote,
    )
    return Node(
        config=config,
        paths=paths,
        keystore=keystore,
        store=store,
        chain=chain,
        index=index,
        records=records,
        access=AccessLog(institution=config.institution, chain=chain),
        enrollments=EnrollmentService(
            institution=config.institution, chain=chain, records=records, clock=clock
        ),
        _blobs=blobs,
        _keys=keys,
        clock=clock,
        _stored_members=stored_members,
    )


def _stored_membership(config: NodeConfig, paths: NodePaths) -> StoredMembership | None:
    """An API worker's view of the consortium's members, if the node is in a consortium.

    The store is opened at the first handshake (a forked worker opens its node
    before the parent has joined the consortium and created it); until it exists
    the genesis's members are trusted, as by a node that has not joined.
    """
    if config.consortium is None or not paths.genesis.exists():
        return None
    genesis = load_genesis(paths.genesis)
    target = store_target(config.storage, paths.consortium_db)

    def open_store() -> ChainStore:
        return factory.open_chain_store(
            config.storage.store,
            target,
            genesis.chain_id,
            schema=store_schema(config, "consortium"),
        )

    return StoredMembership(genesis, open_store)
