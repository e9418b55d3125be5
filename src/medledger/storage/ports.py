"""Storage ports: every store medledger needs from a backend, and what each call guarantees.

One place for every port (chain store, record index, blob store, keystore,
API tokens, peer-request nonces) and the rows they exchange. Adapters live in
one package per backend — :mod:`medledger.storage.sqlite`,
:mod:`medledger.storage.postgres` — plus the filesystem blob store
(:mod:`medledger.storage.blobs`) and the sealed keystore file
(:mod:`medledger.storage.keystore`). The composition root picks adapters
through :mod:`medledger.storage.factory`; nothing else names one. One
conformance suite per port in ``tests/storage`` runs against every adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from medledger.core.keys import SigningKey
from medledger.core.merkle import NodeID
from medledger.core.models import BlockHeader, Signature

__all__ = [
    "RECOVERY_MARK",
    "ROLES",
    "BlobStore",
    "ChainStore",
    "KeyStore",
    "NewBlock",
    "NonceStore",
    "OAuthClient",
    "OAuthGrant",
    "OAuthPending",
    "OAuthStore",
    "OAuthToken",
    "RecordIndex",
    "StoredBlock",
    "TokenInfo",
    "TokenStore",
    "VersionRow",
]

# -- chain store -------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class NewBlock:
    """Everything one block adds to a chain, written in one storage transaction.

    ``nodes`` are the perfect Merkle subtrees of level >= 1 completed by this
    block's leaves (from :class:`~medledger.core.merkle.CompactRange`), so
    proofs can later be served by fetching O(log n) stored hashes. Level-0
    (leaf) hashes are not stored twice: they derive from the transaction data.
    """

    header: BlockHeader
    header_bytes: bytes
    block_hash: bytes
    signatures: tuple[Signature, ...]
    first_index: int
    tx_data: Sequence[bytes]
    tx_hashes: Sequence[bytes]
    nodes: Sequence[tuple[NodeID, bytes]]


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredBlock:
    """A block as stored: raw header bytes and raw transaction bytes, for verification."""

    height: int
    header_bytes: bytes
    block_hash: bytes
    signatures: tuple[Signature, ...]
    first_index: int
    tx_data: tuple[bytes, ...]


class ChainStore(Protocol):
    """Durable, append-only storage of one chain: blocks, transactions, Merkle nodes.

    Guarantees every adapter must keep:

    * ``append_block`` is atomic and durable: when it returns, the whole block
      survives a crash or power loss; if it raises, nothing of it is visible.
    * Heights are contiguous from 0; ``append_block`` raises
      :class:`~medledger.core.errors.Conflict` if the height is not head + 1.
    * Readers never see a partially written block.
    * Failures raise :class:`~medledger.core.errors.StorageError` (or
      ``RetryableStorageError`` when the same call may succeed later).
    """

    def append_block(self, block: NewBlock) -> None: ...

    def head(self) -> StoredBlock | None:
        """The highest block, or ``None`` for an empty chain."""
        ...

    def head_header_bytes(self) -> bytes | None:
        """Canonical header bytes of the highest block (cheap: no transactions read)."""
        ...

    def block(self, height: int) -> StoredBlock:
        """The block at ``height``; raises ``NotFound``."""
        ...

    def block_hash(self, height: int) -> bytes:
        """The hash of the block at ``height`` (no transactions read); raises ``NotFound``."""
        ...

    def iter_blocks(self, start: int = 0, end: int | None = None) -> Iterator[StoredBlock]:
        """Blocks with ``start <= height < end`` in height order, streamed."""
        ...

    def node_hashes(self, ids: Sequence[NodeID]) -> dict[NodeID, bytes]:
        """Hashes of the given perfect subtrees (each fetched by primary key).

        Level-0 ids are answered with the leaf hash of the stored transaction.
        Raises ``NotFound`` naming the first node that is not stored.
        """
        ...

    def iter_nodes(self) -> Iterator[tuple[NodeID, bytes]]:
        """Every stored node (level >= 1) in creation order (for full verification)."""
        ...

    def tx_location(self, tx_hash: bytes) -> tuple[int, int]:
        """``(height, log index)`` of a transaction; raises ``NotFound``."""
        ...

    def tx_by_hash(self, tx_hash: bytes) -> tuple[int, bytes]:
        """``(log index, canonical bytes)`` of a transaction; raises ``NotFound``."""
        ...

    def tx_data(self, index: int) -> bytes:
        """Canonical bytes of the transaction at log ``index``; raises ``NotFound``."""
        ...

    def check_storage(self) -> None:
        """A fast check of the backend's own structures (SQLite: ``PRAGMA quick_check``).

        Raises :class:`~medledger.core.errors.DamagedStore` naming the damage.
        """
        ...

    def damage(self) -> str | None:
        """Why this store can no longer be trusted (the backend reported corruption), or ``None``."""
        ...

    def counts(self) -> tuple[int, int, int]:
        """``(blocks, transactions, nodes)`` stored — lets verification spot leftovers."""
        ...

    def close(self) -> None: ...


# -- record index ------------------------------------------------------------------

#: Meta key: every version indexed on a chain height below this is settled (committed
#: or taken back); crash recovery looks only at versions from this height on.
RECOVERY_MARK: Final = "recovered_through"
#: Meta key: the version of the search terms every live resource's tokens were made
#: with (``services.search.TERMS_VERSION``); absent in an index from before it was kept.
TERMS_VERSION_KEY: Final = "search_terms_version"
#: Meta key: a re-index in progress — the last ``Type/id`` it finished (resumed after).
REINDEX_CURSOR_KEY: Final = "search_reindex_after"


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionRow:
    """One stored version of one resource."""

    resource_type: str
    id: str
    version: int
    blob_hash: bytes
    wrapped_dek: bytes | None
    kek_id: str | None
    patient: str | None
    updated_ms: int
    tx_hash: bytes
    erased: bool = False
    #: Height of the chain's durable head when this version was indexed: its
    #: transaction, if committed, is in a later block. ``None`` for versions
    #: indexed before this was recorded (crash recovery never takes those back).
    chain_base: int | None = None
    #: A deletion (FHIR delete): the resource is gone from this version on, its older
    #: versions kept. The version is sealed like any other (a content-free tombstone).
    deleted: bool = False

    def values(self) -> tuple[Any, ...]:
        return (
            self.resource_type,
            self.id,
            self.version,
            self.blob_hash,
            self.wrapped_dek,
            self.kek_id,
            self.patient,
            self.updated_ms,
            self.tx_hash,
            int(self.erased),
            self.chain_base,
            int(self.deleted),
        )


class RecordIndex(Protocol):
    """Versions, wrapped data keys and blind-index tokens of every record (no plaintext).

    Writes are group committed: a write that returned is durable. A
    ``put_version`` of a version already stored raises
    :class:`~medledger.core.errors.Conflict` without failing the writes batched with it.
    """

    async def put_version(self, row: VersionRow, tokens: set[bytes] | None) -> None:
        """Add a version and make ``tokens`` the resource's search tokens, in one commit.

        ``tokens=None``: the version's tokens follow (:meth:`settle_tokens`); until
        then it is listed by :meth:`pending_tokens` and the resource keeps the
        tokens it had. ``Conflict`` if the version is already stored.
        """
        ...

    async def settle_tokens(self, row: VersionRow, tokens: set[bytes]) -> None:
        """The tokens of a version added with ``tokens=None``: it leaves
        :meth:`pending_tokens`, and if it is still pending and the resource's latest
        version, ``tokens`` become the resource's. Otherwise (a newer version, an
        erasure, a take-back came first) nothing else changes."""
        ...

    def pending_tokens(self) -> list[tuple[str, str, int]]:
        """``(type, id, version)`` of every version whose tokens have not settled."""
        ...

    async def remove_version(self, resource_type: str, rid: str, version: int) -> None: ...
    async def set_tokens(self, resource_type: str, rid: str, tokens: set[bytes]) -> None: ...
    async def erase(self, resource_type: str, rid: str) -> list[bytes]: ...
    async def rewrap(
        self, old_kek_id: str, new_kek_id: str, fn: Callable[[VersionRow], bytes]
    ) -> int: ...
    def latest(self, resource_type: str, rid: str) -> VersionRow | None: ...
    def latest_of(self, resource_type: str, rids: Sequence[str]) -> dict[str, VersionRow]:
        """The latest version of each of ``rids`` that exists, in a few statements."""
        ...

    def get_version(self, resource_type: str, rid: str, version: int) -> VersionRow | None: ...
    def history(self, resource_type: str, rid: str) -> list[VersionRow]: ...
    def type_history(self, resource_type: str, limit: int) -> list[VersionRow]: ...
    def versions_since(self, updated_ms: int) -> list[VersionRow]: ...
    def unsettled(self, from_base: int) -> list[VersionRow]: ...
    def max_chain_base(self) -> int | None: ...
    def recovery_mark(self) -> int: ...
    async def set_recovery_mark(self, height: int) -> None: ...
    def meta(self, key: str) -> str | None:
        """A value the index keeps about itself (``None`` if never set)."""
        ...

    async def set_meta(self, key: str, value: str | None) -> None:
        """Keep (durably) or, with ``None``, forget a value about the index."""
        ...

    def iter_versions(self) -> Iterator[VersionRow]: ...
    def search(self, resource_type: str, groups: list[set[bytes]]) -> list[str]: ...
    def records_of_patient(self, pseudonym: str) -> list[tuple[str, str]]: ...
    def count_wrapped_by(self, kek_id: str) -> int: ...
    async def close(self) -> None: ...


# -- blob store --------------------------------------------------------------------


class BlobStore(Protocol):
    """Immutable blobs keyed by SHA-256. ``put`` is durable when it returns."""

    def put(self, data: bytes) -> bytes:
        """Store ``data``; return its SHA-256. Idempotent."""
        ...

    def put_many(self, blobs: Sequence[bytes]) -> list[bytes]:
        """Store several blobs, durable together when this returns; on error none is stored."""
        ...

    def get(self, blob_hash: bytes) -> bytes:
        """The blob's bytes; ``NotFound`` if absent, ``IntegrityError`` if altered."""
        ...

    def delete(self, blob_hash: bytes) -> None:
        """Remove the blob if present (crypto-shredding removes ciphertext too)."""
        ...

    def exists(self, blob_hash: bytes) -> bool: ...

    def iter_hashes(self, *, older_than: float | None = None) -> Iterator[bytes]:
        """Every stored blob's hash (by name; contents not read).

        ``older_than`` (seconds since the epoch): only blobs last written before
        then, so a sweep never considers a blob a write in progress just stored.
        """
        ...


# -- keystore ----------------------------------------------------------------------


class KeyStore(Protocol):
    """Where an institution's secrets live. Adapters: file (default); Vault later."""

    def signing_key(self) -> SigningKey: ...

    def secret(self, name: str) -> bytes: ...

    def put_secret(self, name: str, value: bytes) -> None: ...

    def delete_secret(self, name: str) -> None: ...

    def update(self, changes: Mapping[str, bytes | None]) -> None:
        """Set (or, for ``None``, delete) several secrets in one atomic write."""
        ...


# -- API tokens --------------------------------------------------------------------

#: The roles a token can carry.
ROLES: Final = ("clinician", "auditor", "admin", "patient")


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenInfo:
    """Who a valid token speaks for."""

    id: str
    role: str
    patient: str | None
    label: str
    expires_ms: int | None
    revoked: bool
    #: The OAuth scopes an access token was granted (``None``: a plain API token, role only).
    scopes: tuple[str, ...] | None = None
    #: Who owns what the token starts (a bulk export job). An OAuth access token is
    #: replaced at every refresh, so its owner is the sign-in's grant or, for
    #: client_credentials, the client; ``None``: the token itself (see :attr:`owner`).
    principal: str | None = None

    @property
    def owner(self) -> str:
        """The owner of what this token starts: :attr:`principal`, else the token's id."""
        return self.principal or self.id


class TokenStore(Protocol):
    """API bearer tokens: issued once, stored only as hashes, revocable, expiring.

    Every call is durable when it returns. A token reads ``mlt_<id>_<secret>``;
    only the id and the secret's SHA-256 are stored.
    """

    def create(
        self,
        *,
        role: str,
        now_ms: int,
        patient: str | None = None,
        label: str = "",
        ttl_ms: int | None = None,
    ) -> tuple[str, TokenInfo]:
        """Issue a token; returns the secret token text (shown once) and its info."""
        ...

    def check(self, token: str, *, now_ms: int) -> TokenInfo:
        """The info of a valid token; ``InvalidInput`` for malformed, unknown, expired or revoked."""
        ...

    def revoke(self, token_id: str) -> None:
        """Revoke a token; ``NotFound`` if no such token."""
        ...

    def current(self, token_id: str, *, now_ms: int) -> TokenInfo | None:
        """The info of token ``token_id`` if it is neither revoked nor expired, else ``None``.

        By id, without the secret: for what was granted *with* a token (an
        OAuth grant of a staff sign-in), which must end when the token does.
        """
        ...

    def list(self) -> list[TokenInfo]:
        """Every token, oldest first (revoked and expired ones included)."""
        ...

    def close(self) -> None: ...


# -- peer-request nonces -----------------------------------------------------------


class NonceStore(Protocol):
    """``(reader, nonce)`` pairs of peer requests seen, so a captured request cannot be replayed.

    ``remember`` is durable before it returns; nonces of requests older than
    ``forget_before_ms`` may be forgotten (the clock-skew window refuses them).
    """

    async def remember(
        self, reader: str, nonce: str, time_ms: int, *, forget_before_ms: int
    ) -> None:
        """Record a nonce; raise :class:`~medledger.core.errors.InvalidInput` if ``reader`` used it before."""
        ...

    async def close(self) -> None: ...


# -- OAuth 2.0 authorization server ------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class OAuthClient:
    """An application registered to obtain tokens (SMART App Launch).

    ``secret_hash``: SHA-256 of a confidential client's secret (``None`` for a
    public client). ``redirect_uris`` are matched exactly. ``system_role``: the
    role a confidential client's ``client_credentials`` token carries, if any.
    """

    id: str
    name: str
    redirect_uris: tuple[str, ...]
    secret_hash: bytes | None
    system_role: str | None
    created_ms: int

    @property
    def confidential(self) -> bool:
        return self.secret_hash is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class OAuthPending:
    """One single-use step of the authorization-code flow.

    ``kind`` ``request``: a sign-in in progress (stages ``signin`` →
    ``approve`` → ``done``); ``code``: an issued authorization code (stages
    ``issued`` → ``redeemed``). ``secret_hash`` is SHA-256 of the secret the
    holder must show (the sign-in form's CSRF token, or the code's secret);
    ``payload`` is canonical JSON the service reads; ``grant`` the grant a
    redeemed code issued (revoked if the code is replayed).
    """

    id: str
    kind: str
    stage: str
    secret_hash: bytes
    payload: str
    expires_ms: int
    grant: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OAuthGrant:
    """What a user approved for a client: one family of access and refresh tokens."""

    id: str
    client_id: str
    role: str
    patient: str | None
    scope: str
    label: str
    created_ms: int
    revoked: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class OAuthToken:
    """An access or refresh token of a grant, stored as SHA-256 of its secret.

    ``state``: ``live``, ``used`` (a refresh token rotated away) or ``revoked``.
    ``scope``: what an access token may do when a refresh asked for less than the
    grant (RFC 6749 §6); ``None``: the grant's scope.
    """

    id: str
    kind: str
    grant: str
    secret_hash: bytes
    expires_ms: int
    state: str = "live"
    scope: str | None = None


class OAuthStore(Protocol):
    """Clients, sign-in steps, codes, grants and tokens of the node's authorization server.

    Every write is durable when it returns. The ``advance_*`` calls are the
    single-use guarantee: each moves a row from one stage to the next
    atomically and says whether *this* call did it, so of two concurrent
    redemptions of one code exactly one succeeds.
    """

    def add_client(self, client: OAuthClient) -> None:
        """Register a client; :class:`~medledger.core.errors.Conflict` if the id is taken."""
        ...

    def client(self, client_id: str) -> OAuthClient | None: ...

    def clients(self) -> list[OAuthClient]:
        """Every registered client, oldest first."""
        ...

    def remove_client(self, client_id: str) -> int | None:
        """Unregister a client, revoking every grant it holds first (a crash in between
        leaves it registered with nothing valid, and removing again finishes); the number
        of grants revoked, ``None`` if no such client is registered."""
        ...

    def put_pending(self, pending: OAuthPending) -> None: ...

    def pending(self, pending_id: str, kind: str) -> OAuthPending | None: ...

    def advance_pending(
        self,
        pending_id: str,
        kind: str,
        from_stage: str,
        to_stage: str,
        *,
        payload: str | None = None,
        grant: str | None = None,
    ) -> bool:
        """Move a step from ``from_stage`` to ``to_stage`` (and set ``payload``/``grant``
        when given); ``False`` if it was not at ``from_stage`` (already used, or absent)."""
        ...

    def add_grant(self, grant: OAuthGrant) -> None: ...

    def grant(self, grant_id: str) -> OAuthGrant | None: ...

    def revoke_grant(self, grant_id: str) -> None:
        """Revoke a grant: every token of it stops working at once (absent: nothing happens)."""
        ...

    def add_token(self, token: OAuthToken) -> None: ...

    def token(self, token_id: str) -> OAuthToken | None: ...

    def advance_token(self, token_id: str, from_state: str, to_state: str) -> bool:
        """Move a token from ``from_state`` to ``to_state``; ``False`` if it was not there."""
        ...

    def forget_expired(self, *, now_ms: int, retain_ms: int) -> int:
        """Delete what expired; how many rows.

        Sign-in steps (``request``) go as soon as they expired (a spent or
        expired one is refused either way); codes and tokens are kept
        ``retain_ms`` past expiry, so a late replay is still recognized as one.
        """
        ...

    def close(self) -> None: ...
