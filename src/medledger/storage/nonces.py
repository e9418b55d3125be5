"""Peer-request nonces, the same on every backend: what one use is, when old ones go.

A request is only accepted within the clock-skew window around its
timestamp, so a nonce needs remembering only that long; older entries are
pruned, at most every :data:`PRUNE_EVERY_MS` of request time. The SQLite
(:mod:`~medledger.storage.sqlite.nonces`) and PostgreSQL
(:mod:`~medledger.storage.postgres.nonces`) stores group-commit a batch of
:class:`NonceUse` in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from medledger.core.errors import InvalidInput

__all__ = ["PRUNE_EVERY_MS", "NonceUse", "replay"]

#: Old nonces are deleted at most this often (ms of request time).
PRUNE_EVERY_MS: Final = 10_000


@dataclass(frozen=True, slots=True)
class NonceUse:
    """One request's nonce, to be remembered unless ``reader`` used it before."""

    reader: str
    nonce: str
    time_ms: int
    forget_before_ms: int


def replay() -> InvalidInput:
    """The error for a nonce used before (the same words on every backend)."""
    return InvalidInput("the request nonce was already used (replay)")
