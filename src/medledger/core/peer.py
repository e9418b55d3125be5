"""Member-to-member sharing messages and the provenance checks on a shared record. Pure.

A *peer request* is what a reading member sends a holding member: which
operation, which consent, which resource, a fresh nonce and the reader's
clock, signed with the reader's member key over domain-separated canonical
bytes (so a signed request can never pass for a signed transaction).

A *provenance* bundle is what lets the reader trust a record without
trusting the holder: the ``record.put`` tx, its RFC 6962 inclusion proof
against the holder's anchored log root, and the anchor tx proven inside a
consortium block that carries a quorum finality certificate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from medledger.core.consortium import MemberSet
from medledger.core.encoding import canonical_bytes
from medledger.core.errors import IntegrityError, InvalidInput, InvalidSignature, MedledgerError
from medledger.core.hashing import hash_from_hex, sha256
from medledger.core.keys import SigningKey
from medledger.core.merkle import leaf_hash, verify_inclusion
from medledger.core.models import BlockHeader, Signature, Transaction
from medledger.core.tls import certificate_fingerprint
from medledger.core.transactions import ANCHOR, RECORD_PUT

__all__ = [
    "PEER_OPS",
    "AnchorProof",
    "PeerRequest",
    "Provenance",
    "SignedPeerRequest",
    "share_info",
]

PEER_OPS = ("fetch", "list")
_DOMAIN = b"medledger-peer-request-v1\n"
_FIELDS = {"op", "reader", "holder", "consent", "resource", "nonce", "time_ms"}
_RESOURCE = re.compile(r"[A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64}(/_history/[1-9][0-9]{0,9})?")
_NONCE = re.compile(r"[0-9a-f]{32}")


def share_info(holder: str, reader: str, blob_hash: bytes, request_hash: bytes) -> bytes:
    """HPKE ``info`` of a fetch answer: binds a wrapped key to one holder, reader,
    ciphertext and request (canonical ``{"medledger-share": {...}}``)."""
    return canonical_bytes(
        {
            "medledger-share": {
                "holder": holder,
                "reader": reader,
                "blob": blob_hash.hex(),
                "request": request_hash.hex(),
            }
        }
    )


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidInput(f"{what} must be a non-negative integer")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerRequest:
    """What a reader asks a holder (see module docstring)."""

    op: str
    reader: str
    holder: str
    consent: str
    resource: str
    nonce: str
    time_ms: int
    _signing: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.op not in PEER_OPS:
            raise InvalidInput(f"peer request op must be one of {', '.join(PEER_OPS)}")
        if not all(isinstance(v, str) and v for v in (self.reader, self.holder)):
            raise InvalidInput("peer request reader and holder must be member ids")
        hash_from_hex(self.consent, "peer request consent")
        if not isinstance(self.nonce, str) or not _NONCE.fullmatch(self.nonce):
            raise InvalidInput("peer request nonce must be 32 lowercase hex characters")
        _int(self.time_ms, "peer request time_ms")
        if self.op == "fetch":
            if not isinstance(self.resource, str) or not _RESOURCE.fullmatch(self.resource):
                raise InvalidInput("peer fetch resource must be Type/id or Type/id/_history/n")
        elif self.resource != "":
            raise InvalidInput("peer list takes no resource")

    @property
    def target(self) -> tuple[str, str, int | None]:
        """``(resource type, id, version or None)`` of a fetch."""
        parts = self.resource.split("/")
        return parts[0], parts[1], int(parts[3]) if len(parts) == 4 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "reader": self.reader,
            "holder": self.holder,
            "consent": self.consent,
            "resource": self.resource,
            "nonce": self.nonce,
            "time_ms": self.time_ms,
        }

    def signing_bytes(self) -> bytes:
        # Needed several times per request (sign or verify, hash, HPKE info): kept once made.
        if self._signing is None:
            object.__setattr__(self, "_signing", _DOMAIN + canonical_bytes(self.to_json()))
        assert self._signing is not None
        return self._signing

    def hash(self) -> bytes:
        return sha256(self.signing_bytes())

    def sign(self, key: SigningKey) -> SignedPeerRequest:
        return SignedPeerRequest(request=self, signature=key.sign(self.signing_bytes()))

    @classmethod
    def from_json(cls, value: Any) -> PeerRequest:
        if not isinstance(value, dict) or set(value) != _FIELDS:
            raise InvalidInput(f"peer request must have exactly {', '.join(sorted(_FIELDS))}")
        return cls(**value)


@dataclass(frozen=True, slots=True, kw_only=True)
class SignedPeerRequest:
    """A request with the reader's member signature: ``{"request", "signature"}``."""

    request: PeerRequest
    signature: Signature

    def to_json(self) -> dict[str, Any]:
        return {"request": self.request.to_json(), "signature": self.signature.to_json()}

    @classmethod
    def from_json(cls, value: Any) -> SignedPeerRequest:
        if not isinstance(value, dict) or set(value) != {"request", "signature"}:
            raise InvalidInput("a signed peer request has exactly request and signature")
        return cls(
            request=PeerRequest.from_json(value["request"]),
            signature=Signature.from_json(value["signature"]),
        )

    def verify(self, members: MemberSet) -> None:
        """The reader is a current member and signed exactly this request."""
        member = members.by_id(self.request.reader)
        if member is None:
            raise InvalidSignature(f"{self.request.reader!r} is not a consortium member")
        if self.signature.signer != member.fingerprint:
            raise InvalidSignature(f"the request is not signed with {member.id}'s member key")
        member.signing_key.verify(self.signature, self.request.signing_bytes())

    def verify_channel(self, members: MemberSet, client_cert: bytes | None) -> None:
        """The connection it came on belongs to its signer (call after :meth:`verify`).

        A reader with a pinned TLS certificate (``core.tls``) must have presented
        exactly that certificate as its TLS client certificate: a member's
        certificate carrying another member's signed request is refused, so a
        request cannot be relayed through someone else's connection. A reader
        without a pinned certificate (a consortium formed before TLS) is not bound.
        """
        member = members.by_id(self.request.reader)
        if member is None:
            raise InvalidSignature(f"{self.request.reader!r} is not a consortium member")
        if member.tls_cert is None:
            return
        if client_cert is None:
            raise InvalidSignature(
                f"{member.id}'s requests must come over mutual TLS with its member certificate"
            )
        if certificate_fingerprint(client_cert) != member.tls_cert.fingerprint:
            raise InvalidSignature(
                "the TLS client certificate does not belong to the member that signed the request"
            )


def _hashes(value: Any, what: str) -> list[bytes]:
    if not isinstance(value, list):
        raise InvalidInput(f"{what} must be a list of hex hashes")
    return [hash_from_hex(h, what) for h in value]


@dataclass(frozen=True, slots=True, kw_only=True)
class AnchorProof:
    """An anchor tx, proven in a consortium block that carries its finality certificate."""

    tx: Transaction
    leaf_index: int
    proof: tuple[bytes, ...]
    header: BlockHeader
    certificate: tuple[Signature, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "tx": self.tx.to_json(),
            "leaf_index": self.leaf_index,
            "proof": [h.hex() for h in self.proof],
            "header": self.header.to_json(),
            "certificate": [s.to_json() for s in self.certificate],
        }

    @classmethod
    def from_json(cls, value: Any) -> AnchorProof:
        if not isinstance(value, dict) or set(value) != {
            "tx",
            "leaf_index",
            "proof",
            "header",
            "certificate",
        }:
            raise InvalidInput(
                "anchor proof has exactly tx, leaf_index, proof, header, certificate"
            )
        if not isinstance(value["certificate"], list):
            raise InvalidInput("anchor certificate must be a list of signatures")
        return cls(
            tx=Transaction.from_json(value["tx"]),
            leaf_index=_int(value["leaf_index"], "anchor leaf_index"),
            proof=tuple(_hashes(value["proof"], "anchor proof")),
            header=BlockHeader.from_json(value["header"]),
            certificate=tuple(Signature.from_json(s) for s in value["certificate"]),
        )

    def verify(self, *, chain_id: str, holder: str, members: MemberSet) -> tuple[int, bytes]:
        """Check the anchor is ``holder``'s and final; return its ``(log_size, log_root)``."""
        header = self.header
        if header.chain != chain_id:
            raise IntegrityError(f"the anchor block is on {header.chain!r}, not {chain_id!r}")
        try:
            # Strict for current members' keys; a signer who has since left or rotated
            # its key is not counted (the certificate is of an earlier member set).
            signers = members.certificate_signers(header.hash(), self.certificate, others=True)
        except InvalidSignature as exc:
            raise IntegrityError(
                f"the anchor is not final: its certificate carries {exc}"
            ) from None
        if len(signers) < members.quorum:
            raise IntegrityError(
                f"the anchor is not final: {len(signers)} valid member signatures, "
                f"{members.quorum} needed"
            )
        try:
            verify_inclusion(
                leaf_hash(self.tx.encode()),
                self.leaf_index,
                header.log_size,
                list(self.proof),
                header.log_root,
            )
        except MedledgerError as exc:
            raise IntegrityError(f"the anchor is not in the final block: {exc}") from None
        body = self.tx.body
        member = members.by_id(holder)
        if self.tx.type != ANCHOR or body.get("institution") != holder or member is None:
            raise IntegrityError(f"the anchor is not one of {holder}'s")
        if len(self.tx.signatures) != 1 or self.tx.signatures[0].signer != member.fingerprint:
            raise IntegrityError(f"the anchor is not signed by {holder}")
        try:
            member.signing_key.verify(self.tx.signatures[0], self.tx.signing_bytes())
            return _int(body.get("log_size"), "anchor log_size"), hash_from_hex(
                body.get("log_root"), "anchor log_root"
            )
        except MedledgerError as exc:
            raise IntegrityError(f"the anchor is malformed: {exc}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class Provenance:
    """Why a reader may believe a shared record (see module docstring)."""

    record_tx: Transaction
    leaf_index: int
    proof: tuple[bytes, ...]
    anchor: AnchorProof

    def to_json(self) -> dict[str, Any]:
        return {
            "record_tx": self.record_tx.to_json(),
            "leaf_index": self.leaf_index,
            "proof": [h.hex() for h in self.proof],
            "anchor": self.anchor.to_json(),
        }

    @classmethod
    def from_json(cls, value: Any) -> Provenance:
        if not isinstance(value, dict) or set(value) != {
            "record_tx",
            "leaf_index",
            "proof",
            "anchor",
        }:
            raise InvalidInput("provenance has exactly record_tx, leaf_index, proof, anchor")
        return cls(
            record_tx=Transaction.from_json(value["record_tx"]),
            leaf_index=_int(value["leaf_index"], "record leaf_index"),
            proof=tuple(_hashes(value["proof"], "record proof")),
            anchor=AnchorProof.from_json(value["anchor"]),
        )

    def verify(
        self,
        *,
        consortium_chain: str,
        holder: str,
        members: MemberSet,
        resource_type: str,
        version: int | None,
        blob: bytes,
        anchored: tuple[int, bytes] | None = None,
    ) -> None:
        """Check the record is ``holder``'s, anchored in a final block, and is ``blob``.

        ``anchored``: what :meth:`AnchorProof.verify` returned for this very
        anchor proof and member set, if the caller already checked it (many
        records are proven against one anchor).
        Raises :class:`IntegrityError` naming the first piece that fails.
        """
        log_size, log_root = anchored or self.anchor.verify(
            chain_id=consortium_chain, holder=holder, members=members
        )
        tx, body = self.record_tx, self.record_tx.body
        if tx.type != RECORD_PUT or tx.chain != f"private:{holder}":
            raise IntegrityError(f"the record transaction is not a record.put of {holder}")
        if body.get("resource_type") != resource_type or (
            version is not None and body.get("version") != version
        ):
            raise IntegrityError("the record transaction is for another resource or version")
        if body.get("blob") != sha256(blob).hex():
            raise IntegrityError("the ciphertext does not match the committed record (tampered)")
        try:
            verify_inclusion(
                leaf_hash(tx.encode()), self.leaf_index, log_size, list(self.proof), log_root
            )
        except MedledgerError as exc:
            raise IntegrityError(
                f"the record is not in {holder}'s anchored log (wrong proof): {exc}"
            ) from None
