"""Frozen, typed domain values and their exact canonical JSON forms.

Every model has ``to_json()`` (a JSON-subset value whose canonical bytes are
what hashes and signatures cover) and a strict ``from_json()`` that accepts
exactly that shape and raises :class:`InvalidInput` for anything else, so
``Model.from_json(m.to_json()) == m`` and ``canonical_bytes`` round-trips.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from medledger.core.encoding import canonical_bytes, canonical_bytes_of_checked, parse_canonical
from medledger.core.errors import InvalidInput
from medledger.core.hashing import check_hash, hash_from_hex, sha256

__all__ = [
    "SIGNATURE_ALGORITHMS",
    "Block",
    "BlockHeader",
    "Receipt",
    "Signature",
    "Signer",
    "Transaction",
]

#: Signature algorithms the format knows. ``ml-dsa-65`` is reserved for a
#: post-quantum co-signature; adding it needs no format change.
SIGNATURE_ALGORITHMS = frozenset({"ecdsa-p256-sha256", "ml-dsa-65"})


def _obj(
    value: Any, keys: set[str], what: str, optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    missing = keys - value.keys()
    extra = value.keys() - keys - optional
    if missing:
        raise InvalidInput(f"{what} is missing {', '.join(sorted(missing))}")
    if extra:
        raise InvalidInput(f"{what} has unknown field {', '.join(sorted(extra))}")
    return value


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidInput(f"{what} must be a non-negative integer")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{what} must be a non-empty string")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class Signature:
    """A signature kept beside what it signs: ``{"signer", "alg", "sig"}``.

    ``signer`` is the key fingerprint (hex SHA-256 of the public key's DER
    SubjectPublicKeyInfo); ``sig`` is the DER signature (hex in JSON).
    """

    signer: str
    alg: str
    sig: bytes

    def __post_init__(self) -> None:
        hash_from_hex(self.signer, "signature signer fingerprint")
        if self.alg not in SIGNATURE_ALGORITHMS:
            raise InvalidInput(f"unknown signature algorithm {self.alg!r}")
        if not isinstance(self.sig, bytes) or not 0 < len(self.sig) <= 8192:
            raise InvalidInput("signature bytes must be 1..8192 bytes")

    def to_json(self) -> dict[str, Any]:
        return {"signer": self.signer, "alg": self.alg, "sig": self.sig.hex()}

    @classmethod
    def from_json(cls, value: Any) -> Signature:
        v = _obj(value, {"signer", "alg", "sig"}, "signature")
        sig = v["sig"]
        if not isinstance(sig, str):
            raise InvalidInput("signature sig must be hex")
        try:
            raw = bytes.fromhex(sig)
        except ValueError:
            raise InvalidInput("signature sig is not hex") from None
        if raw.hex() != sig:
            # One spelling per signature: re-encoding a parsed tx gives its bytes back.
            raise InvalidInput("signature sig must be lowercase hex without spaces")
        return cls(signer=v["signer"], alg=_str(v["alg"], "signature alg"), sig=raw)


_TX_KEYS = frozenset({"type", "chain", "body", "time_ms"})
_SIGNED_TX_KEYS = _TX_KEYS | {"signatures"}


class Signer(Protocol):
    """Anything that signs a message (``core.keys.SigningKey``)."""

    def sign(self, message: bytes) -> Signature: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Transaction:
    """A chain transaction: canonical JSON ``{type, chain, body, time_ms[, signatures]}``.

    Its hash is SHA-256 of its canonical bytes, and those bytes are its RFC
    6962 leaf data. ``signatures`` are by the transaction's authors (a patient,
    a member) over :meth:`signing_bytes`, i.e. the transaction without them.
    """

    type: str
    chain: str
    body: dict[str, Any]
    time_ms: int
    signatures: tuple[Signature, ...] = field(default=())
    # Canonical bytes, once computed (or known from decoding). A transaction is
    # immutable, body included, so they never go stale; encoding is the
    # largest per-transaction cost of validating members.
    _encoded: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _str(self.type, "transaction type")
        _str(self.chain, "transaction chain")
        _int(self.time_ms, "transaction time_ms")
        if not isinstance(self.body, dict):
            raise InvalidInput("transaction body must be a JSON object")

    def unsigned_json(self) -> dict[str, Any]:
        return {"type": self.type, "chain": self.chain, "body": self.body, "time_ms": self.time_ms}

    def to_json(self) -> dict[str, Any]:
        out = self.unsigned_json()
        if self.signatures:
            out["signatures"] = [s.to_json() for s in self.signatures]
        return out

    def signing_bytes(self) -> bytes:
        """What authors sign: the canonical bytes of the transaction without signatures."""
        if self._encoded is not None:
            # A part of an already-checked value needs no second check.
            return canonical_bytes_of_checked(self.unsigned_json())
        return canonical_bytes(self.unsigned_json())

    def signed_by(self, *signers: Signer) -> Transaction:
        """This transaction with one more signature over :meth:`signing_bytes` per signer."""
        message = self.signing_bytes()
        return Transaction(
            type=self.type,
            chain=self.chain,
            body=self.body,
            time_ms=self.time_ms,
            signatures=(*self.signatures, *(s.sign(message) for s in signers)),
        )

    def encode(self) -> bytes:
        """Canonical bytes: the RFC 6962 leaf data of this transaction."""
        encoded = self._encoded
        if encoded is None:
            encoded = canonical_bytes(self.to_json())
            object.__setattr__(self, "_encoded", encoded)
        return encoded

    def hash(self) -> bytes:
        return sha256(self.encode())

    @classmethod
    def from_json(cls, value: Any) -> Transaction:
        if type(value) is dict and (value.keys() == _TX_KEYS or value.keys() == _SIGNED_TX_KEYS):
            v = value  # the common, well-formed case: field checks happen in __post_init__
        else:
            v = _obj(value, set(_TX_KEYS), "transaction", frozenset({"signatures"}))
        sigs = v.get("signatures", [])
        if not isinstance(sigs, list) or ("signatures" in v and not sigs):
            raise InvalidInput("transaction signatures must be a non-empty list when present")
        return cls(
            type=v["type"],
            chain=v["chain"],
            body=v["body"],
            time_ms=v["time_ms"],
            signatures=tuple(Signature.from_json(s) for s in sigs),
        )

    @classmethod
    def from_checked_json(cls, value: Any) -> Transaction:
        """:meth:`from_json` of a value :func:`parse_canonical` returned (or a part of one)."""
        tx = cls.from_json(value)
        object.__setattr__(tx, "_encoded", canonical_bytes_of_checked(value))
        return tx

    @classmethod
    def decode(cls, data: bytes) -> Transaction:
        """Parse canonical bytes; non-canonical or malformed bytes raise :class:`InvalidInput`."""
        tx = cls.from_json(parse_canonical(data))
        object.__setattr__(tx, "_encoded", bytes(data))
        return tx


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockHeader:
    """Block header; block hash = SHA-256 of its canonical JSON.

    ``tx_root`` is the RFC 6962 root of this block's transactions;
    ``log_size``/``log_root`` describe the log of *all* transactions of the
    chain up to and including this block.
    """

    chain: str
    height: int
    prev_hash: bytes
    tx_root: bytes
    tx_count: int
    log_size: int
    log_root: bytes
    time_ms: int
    proposer: str

    def __post_init__(self) -> None:
        _str(self.chain, "header chain")
        _str(self.proposer, "header proposer")
        _int(self.height, "header height")
        _int(self.tx_count, "header tx_count")
        _int(self.log_size, "header log_size")
        _int(self.time_ms, "header time_ms")
        check_hash(self.prev_hash, "header prev_hash")
        check_hash(self.tx_root, "header tx_root")
        check_hash(self.log_root, "header log_root")
        if self.tx_count > self.log_size:
            raise InvalidInput("header tx_count exceeds log_size")

    def to_json(self) -> dict[str, Any]:
        return {
            "chain": self.chain,
            "height": self.height,
            "prev_hash": self.prev_hash.hex(),
            "tx_root": self.tx_root.hex(),
            "tx_count": self.tx_count,
            "log_size": self.log_size,
            "log_root": self.log_root.hex(),
            "time_ms": self.time_ms,
            "proposer": self.proposer,
        }

    def encode(self) -> bytes:
        return canonical_bytes(self.to_json())

    def hash(self) -> bytes:
        return sha256(self.encode())

    @classmethod
    def from_json(cls, value: Any) -> BlockHeader:
        v = _obj(
            value,
            {
                "chain",
                "height",
                "prev_hash",
                "tx_root",
                "tx_count",
                "log_size",
                "log_root",
                "time_ms",
                "proposer",
            },
            "block header",
        )
        return cls(
            chain=v["chain"],
            height=_int(v["height"], "header height"),
            prev_hash=hash_from_hex(v["prev_hash"], "header prev_hash"),
            tx_root=hash_from_hex(v["tx_root"], "header tx_root"),
            tx_count=_int(v["tx_count"], "header tx_count"),
            log_size=_int(v["log_size"], "header log_size"),
            log_root=hash_from_hex(v["log_root"], "header log_root"),
            time_ms=_int(v["time_ms"], "header time_ms"),
            proposer=v["proposer"],
        )

    @classmethod
    def decode(cls, data: bytes) -> BlockHeader:
        return cls.from_json(parse_canonical(data))


@dataclass(frozen=True, slots=True, kw_only=True)
class Block:
    """A header, the signatures over its hash, and its transactions.

    JSON form (``chain export``, ``/chain/.../blocks/{h}``)::

        {"header": {...}, "hash": hex, "signatures": [{"signer", "alg", "sig"}], "txs": [{...}]}
    """

    header: BlockHeader
    signatures: tuple[Signature, ...]
    txs: tuple[Transaction, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "header": self.header.to_json(),
            "hash": self.header.hash().hex(),
            "signatures": [s.to_json() for s in self.signatures],
            "txs": [t.to_json() for t in self.txs],
        }

    @classmethod
    def from_json(cls, value: Any) -> Block:
        v = _obj(value, {"header", "hash", "signatures", "txs"}, "block")
        header = BlockHeader.from_json(v["header"])
        if hash_from_hex(v["hash"], "block hash") != header.hash():
            raise InvalidInput(f"block {header.height}: hash does not match its header")
        if not isinstance(v["signatures"], list) or not isinstance(v["txs"], list):
            raise InvalidInput("block signatures and txs must be lists")
        return cls(
            header=header,
            signatures=tuple(Signature.from_json(s) for s in v["signatures"]),
            txs=tuple(Transaction.from_json(t) for t in v["txs"]),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    """What a writer gets once its transaction is durable: where it is and its hash."""

    height: int
    index: int
    tx_hash: bytes

    def to_json(self) -> dict[str, Any]:
        return {"height": self.height, "index": self.index, "tx_hash": self.tx_hash.hex()}
