"""What the records service takes in and hands out, and the chain it commits on."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from medledger.core.models import Receipt, Transaction
from medledger.services.fhir import load_json
from medledger.storage.ports import ChainStore, VersionRow

__all__ = [
    "RecordChain",
    "SealedCommit",
    "SealedVersion",
    "SealedWrite",
    "StoredResource",
    "VersionCommitter",
    "VersionInfo",
    "WriteIntent",
    "instant",
    "version_key",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class WriteIntent:
    """One version a request asks to write, before anything is stored.

    ``create`` is a POST: the id is new and must not exist. Otherwise it is a
    PUT (update, or update-as-create); ``if_match`` is the version the client
    last saw, if it said.
    """

    resource_type: str
    id: str
    #: The resource as submitted (PHI): never in a repr.
    resource: dict[str, Any] = field(repr=False)
    if_match: int | None = None
    create: bool = False
    #: A FHIR delete: the resource must exist; this version is its tombstone.
    delete: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredResource:
    """A resource version as stored: the exact JSON bytes and where it is on the chain."""

    resource_type: str
    id: str
    version: int
    last_updated: str
    #: The decrypted resource (PHI): never in a repr, so never in a log line.
    data: bytes = field(repr=False)
    tx_hash: bytes
    #: The patient pseudonym the version was committed with (for the access trail).
    patient: str | None = None

    def resource(self) -> dict[str, Any]:
        value: dict[str, Any] = load_json(self.data, max_bytes=len(self.data))
        return value


@dataclass(frozen=True, slots=True, kw_only=True)
class SealedWrite:
    """A version sealed and its blob stored, not yet indexed or committed."""

    row: VersionRow
    #: The version's blind search tokens.
    tokens: set[bytes] = field(repr=False)
    stored: StoredResource
    tx: Transaction


@dataclass(frozen=True, slots=True, kw_only=True)
class SealedCommit:
    """What the sequencer indexes and commits for an API worker's sealed version."""

    row: VersionRow
    tokens: set[bytes] = field(repr=False)
    tx: Transaction


@dataclass(frozen=True, slots=True, kw_only=True)
class SealedVersion:
    """One stored version with its data key, as the sharing protocol needs it."""

    row: VersionRow
    blob: bytes
    #: The record's data key in clear: never in a repr.
    dek: bytes = field(repr=False)
    tx_data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionInfo:
    """One entry of a history: a readable version, or ``stored`` is ``None``: an erased
    version, or a deletion (``deleted``)."""

    resource_type: str
    id: str
    version: int
    last_updated: str
    stored: StoredResource | None
    deleted: bool = False
    #: When the version was written (ms since the epoch), for ``_since`` and ``_at``.
    updated_ms: int = 0


class RecordChain(Protocol):
    """The chain record transactions are committed on.

    The institution's ``PrivateChain``; or the benchmark-only consortium-only
    mode's ``ConsortiumCommit``, whose transactions also need the author
    signature ``RecordsService(sign_tx=…)``.
    """

    @property
    def chain_id(self) -> str: ...

    @property
    def store(self) -> ChainStore: ...

    @property
    def durable_height(self) -> int:
        """Height of the last block that is durable in ``store``."""
        ...

    async def submit(self, tx_type: str, body: dict[str, Any]) -> Receipt: ...

    async def submit_many(self, txs: Sequence[Transaction]) -> list[Receipt]: ...


class VersionCommitter(Protocol):
    """Where an API worker's sealed versions are indexed and committed: the sequencer."""

    async def commit_versions(self, sealed: Sequence[SealedWrite]) -> None:
        """Index and commit ``sealed`` all-or-nothing; return once durable.

        Raises :class:`~medledger.core.errors.WriteRaced` when another writer
        got there first (nothing written), or the error the commit failed with.
        """
        ...


#: 10000-01-01T00:00:00Z in ms: below it (and from the epoch on) the year has four digits.
_YEAR_10000_MS = 253_402_300_800_000


# Pure, and every read formats its version's time: the versions read often come back
# (4,096 remembered, as ``api.fhir`` remembers their HTTP dates).
@functools.lru_cache(maxsize=4096)
def instant(ms: int) -> str:
    """``ms`` since the epoch as a FHIR ``instant`` (UTC, millisecond precision)."""
    if 0 <= ms < _YEAR_10000_MS:
        # Every read formats its version's time: integer seconds and milliseconds cost
        # a third less than a datetime, and are exact (``ms / 1000`` as a float is not
        # beyond the year 2106).
        seconds, millis = divmod(ms, 1000)
        return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{millis:03d}Z"
    return (
        datetime.fromtimestamp(ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def version_key(row: VersionRow) -> tuple[str, str, int]:
    """``(type, id, version)``: one version of one resource."""
    return (row.resource_type, row.id, row.version)
