"""SHA-256, the only hash function of medledger's fixed formats."""

from __future__ import annotations

import hashlib

from medledger.core.errors import InvalidInput

__all__ = ["HASH_SIZE", "ZERO_HASH", "check_hash", "hash_from_hex", "sha256"]

HASH_SIZE = 32
#: ``prev_hash`` of the first block of every chain.
ZERO_HASH = bytes(HASH_SIZE)


def sha256(data: bytes) -> bytes:
    """Return SHA-256(data) as 32 raw bytes."""
    return hashlib.sha256(data).digest()


def check_hash(value: bytes, what: str = "hash") -> bytes:
    """Return ``value`` if it is 32 bytes, else raise :class:`InvalidInput`."""
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise InvalidInput(f"{what} must be {HASH_SIZE} bytes")
    return value


def hash_from_hex(text: object, what: str = "hash") -> bytes:
    """Parse a lowercase-hex SHA-256 value as used in medledger JSON."""
    if not isinstance(text, str) or len(text) != 2 * HASH_SIZE:
        raise InvalidInput(f"{what} must be {2 * HASH_SIZE} hex characters")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise InvalidInput(f"{what} is not hex") from None
    if raw.hex() != text:
        raise InvalidInput(f"{what} must be lowercase hex")
    return raw
