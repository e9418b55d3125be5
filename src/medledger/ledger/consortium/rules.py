"""The consortium's transaction rules: a deterministic state machine over final txs.

``check`` says whether a transaction is acceptable *now* (raising the reason
every honest member gives), ``apply`` updates the state. Rules:

* Every tx names this consortium chain, fits the size limit, carries at least
  one author signature, and is not a replay (its hash was never accepted).
  No clock decides validity: a member's clock could be wrong or hostile, and
  one far-future timestamp must not make every later honest tx "stale".
* ``anchor`` — signed by the member it anchors; ``log_size`` grows; the
  RFC 6962 consistency proof from the previous anchor verifies, so an
  institution that rewrote its private history cannot anchor again.
* ``member.add`` / ``member.remove`` / ``member.rotate`` / ``member.tls``
  (a new pinned TLS certificate, keys unchanged) — signed by a quorum of
  current members.
* ``access`` — a cross-institution read summary, signed by the member
  that held the record (it decided the outcome, and it cannot be skipped by
  a reader that would rather not be seen); pseudonyms and hashes only.
* ``access.batch`` — the same summaries, up to :data:`MAX_ACCESS_BATCH` of
  them under one holder signature: ``{"holder", "entries": [{"reader",
  "patient", "consent", "resource", "outcome"}, ...]}``. A busy holder
  reports its reads in batches so the consortium signs and checks one tx
  per batch, not one per read.
* ``consent.grant`` / ``consent.revoke`` — signed by the patient's key (see
  ``core.consent``); the grantee is a current member; a revocation names an
  unrevoked grant of the same patient.
* ``patient.rebind`` — an institution announces an administrator's
  break-glass re-binding of one of its Patients from key ``previous`` to key
  ``patient`` (``core.enrollment``), signed by that institution's member
  key: ``{"institution", "patient", "previous", "actor"}``, fingerprints and
  ``admin:<token id>`` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from medledger.core.consent import (
    CONSENT_GRANT,
    CONSENT_TYPES,
    ConsentGrant,
    ConsentRecord,
    ConsentRevoke,
)
from medledger.core.consortium import Member, MemberSet
from medledger.core.enrollment import PATIENT_REBIND, REBIND_ACTOR, REBIND_REPORT_FIELDS
from medledger.core.errors import InconsistentLog, InvalidInput, InvalidSignature, MedledgerError
from medledger.core.hashing import hash_from_hex
from medledger.core.keys import VerifyingKey
from medledger.core.merkle import verify_consistency
from medledger.core.models import Transaction
from medledger.core.tls import MemberCertificate
from medledger.core.transactions import (
    ACCESS,
    ACCESS_BATCH,
    ACCESS_BATCH_ENTRY,
    ANCHOR,
    CONSORTIUM_BODIES,
    MEMBER_ADD,
    MEMBER_REMOVE,
    MEMBER_TLS,
    MEMBER_TYPES,
)

__all__ = [
    "MAX_ACCESS_BATCH",
    "MAX_CONSORTIUM_TX_BYTES",
    "AnchorRecord",
    "ConsortiumState",
]

#: Larger consortium transactions are refused by every member (and auditor).
MAX_CONSORTIUM_TX_BYTES = 64 * 1024
#: Entries of one ``access.batch`` (well inside the tx size limit: ~300 bytes each).
MAX_ACCESS_BATCH = 128
_ACCESS_FIELDS = CONSORTIUM_BODIES[ACCESS].required
_BATCH_ENTRY_FIELDS = ACCESS_BATCH_ENTRY.required
_ANCHOR_FIELDS = CONSORTIUM_BODIES[ANCHOR].required


@dataclass(frozen=True, slots=True, kw_only=True)
class AnchorRecord:
    """The latest anchored state of one institution's private chain."""

    institution: str
    height: int
    log_size: int
    log_root: bytes
    block_hash: bytes
    #: Where the anchor is (its tx hash), so sharing can prove it from the consortium
    #: log; not part of the anchored state, so not compared.
    tx_hash: bytes = field(default=b"", compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "institution": self.institution,
            "height": self.height,
            "log_size": self.log_size,
            "log_root": self.log_root.hex(),
            "block_hash": self.block_hash.hex(),
        }


class ConsortiumState:
    """Members, latest anchors and accepted tx hashes, as of some point in the order.

    A consortium starts from ``modes.initial_state(genesis)``, which picks these
    rules or the benchmark-only consortium-only ones by the genesis's mode.
    """

    def __init__(
        self,
        *,
        chain_id: str,
        members: MemberSet,
        anchors: dict[str, AnchorRecord] | None = None,
        seen: set[bytes] | None = None,
        consents: dict[bytes, ConsentRecord] | None = None,
    ) -> None:
        self.chain_id = chain_id
        self._verify = True
        self.members = members
        self.anchors: dict[str, AnchorRecord] = anchors or {}
        # Shared, append-only across copies: the order is never rolled back.
        self.seen: set[bytes] = seen if seen is not None else set()
        #: Consent grants by tx hash, with their revocation once it is applied.
        self.consents: dict[bytes, ConsentRecord] = consents or {}

    def copy(self) -> ConsortiumState:
        return type(self)(
            chain_id=self.chain_id,
            members=self.members,
            anchors=dict(self.anchors),
            seen=self.seen,
            consents=dict(self.consents),
        )

    # -- checking ------------------------------------------------------------------------

    def check(
        self,
        tx: Transaction,
        *,
        tx_hash: bytes | None = None,
        verify_signatures: bool = True,
        size: int | None = None,
    ) -> None:
        """Return if ``tx`` is acceptable now; raise the reason otherwise."""
        if tx.chain != self.chain_id:
            raise InvalidInput(f"transaction names chain {tx.chain!r}, not {self.chain_id!r}")
        length = size if size is not None else len(tx.encode())
        if length > MAX_CONSORTIUM_TX_BYTES:
            raise InvalidInput(
                f"transaction of {length} bytes exceeds the limit of {MAX_CONSORTIUM_TX_BYTES}"
            )
        self._verify = verify_signatures
        if (tx_hash or tx.hash()) in self.seen:
            raise InvalidInput("transaction was already accepted (replay)")
        if not tx.signatures:
            raise InvalidSignature("consortium transactions must be signed")
        if tx.type == ANCHOR:
            self._check_anchor(tx)
        elif tx.type in MEMBER_TYPES:
            self._check_membership(tx)
        elif tx.type == ACCESS:
            self._check_access(tx)
        elif tx.type == ACCESS_BATCH:
            self._check_access_batch(tx)
        elif tx.type in CONSENT_TYPES:
            self._check_consent(tx)
        elif tx.type == PATIENT_REBIND:
            self._check_rebind(tx)
        else:
            self._check_other(tx)

    def _check_other(self, tx: Transaction) -> None:
        """A type no rule above knows: refused here; a mode's rules may accept more."""
        raise InvalidInput(f"unknown consortium transaction type {tx.type!r}")

    def _signer(self, tx: Transaction) -> Member:
        if len(tx.signatures) != 1:
            raise InvalidSignature(f"{tx.type} must carry exactly one signature")
        member = self.members.by_fingerprint(tx.signatures[0].signer)
        if member is None:
            raise InvalidSignature(f"{tx.type} signed by a key that is not a current member's")
        if self._verify:
            member.signing_key.verify(tx.signatures[0], tx.signing_bytes())
        return member

    def _check_anchor(self, tx: Transaction) -> None:
        member = self._signer(tx)
        body = tx.body
        if set(body) != _ANCHOR_FIELDS:
            raise InvalidInput(f"anchor must have exactly {', '.join(sorted(_ANCHOR_FIELDS))}")
        if body["institution"] != member.id:
            raise InvalidSignature(
                f"anchor for {body['institution']!r} signed by member {member.id!r}"
            )
        for name in ("height", "log_size", "prev_size"):
            if not isinstance(body[name], int) or isinstance(body[name], bool) or body[name] < 0:
                raise InvalidInput(f"anchor {name} must be a non-negative integer")
        log_root = hash_from_hex(body["log_root"], "anchor log_root")
        hash_from_hex(body["block_hash"], "anchor block_hash")
        if not isinstance(body["proof"], list):
            raise InvalidInput("anchor proof must be a list of hex hashes")
        proof = [hash_from_hex(h, "anchor proof hash") for h in body["proof"]]
        prev = self.anchors.get(member.id)
        prev_size, prev_root = (prev.log_size, prev.log_root) if prev else (0, b"")
        if body["prev_size"] != prev_size:
            raise InconsistentLog(
                f"anchor of {member.id} builds on size {body['prev_size']}, but the last anchor "
                f"is at size {prev_size}"
            )
        if body["log_size"] <= prev_size or (prev is not None and body["height"] <= prev.height):
            raise InvalidInput(f"anchor of {member.id} does not advance its chain")
        if prev is None:
            if proof:
                raise InvalidInput("a first anchor carries no consistency proof")
            return
        try:
            verify_consistency(prev_size, body["log_size"], proof, prev_root, log_root)
        except MedledgerError as exc:
            raise InconsistentLog(
                f"anchor of {member.id} is not consistent with its previous anchor: {exc}"
            ) from None

    def _check_access(self, tx: Transaction) -> None:
        """A cross-institution read, reported by the holder (pseudonyms and hashes only)."""
        member = self._signer(tx)
        body = tx.body
        if set(body) != _ACCESS_FIELDS or not all(isinstance(v, str) for v in body.values()):
            raise InvalidInput(
                f"access must have exactly {', '.join(sorted(_ACCESS_FIELDS))} (strings)"
            )
        if body["holder"] != member.id:
            raise InvalidSignature(f"access held by {body['holder']!r} signed by {member.id!r}")
        if body["outcome"] not in ("allowed", "refused"):
            raise InvalidInput("access outcome must be 'allowed' or 'refused'")

    def _check_access_batch(self, tx: Transaction) -> None:
        """Several ``access`` summaries of one holder under its one signature."""
        member = self._signer(tx)
        body = tx.body
        entries = body.get("entries")
        if set(body) != CONSORTIUM_BODIES[ACCESS_BATCH].required or not isinstance(entries, list):
            raise InvalidInput("access.batch must have exactly holder and entries (a list)")
        if body["holder"] != member.id:
            raise InvalidSignature(f"access held by {body['holder']!r} signed by {member.id!r}")
        if not 1 <= len(entries) <= MAX_ACCESS_BATCH:
            raise InvalidInput(f"access.batch must have 1 to {MAX_ACCESS_BATCH} entries")
        for entry in entries:
            if (
                not isinstance(entry, dict)
                or set(entry) != _BATCH_ENTRY_FIELDS
                or not all(isinstance(v, str) for v in entry.values())
            ):
                raise InvalidInput(
                    "each access.batch entry must have exactly "
                    f"{', '.join(sorted(_BATCH_ENTRY_FIELDS))} (strings)"
                )
            if entry["outcome"] not in ("allowed", "refused"):
                raise InvalidInput("access outcome must be 'allowed' or 'refused'")

    def _check_rebind(self, tx: Transaction) -> None:
        """A break-glass re-binding, announced by the institution that makes it."""
        member = self._signer(tx)
        body = tx.body
        if set(body) != REBIND_REPORT_FIELDS:
            raise InvalidInput(
                f"patient.rebind must have exactly {', '.join(sorted(REBIND_REPORT_FIELDS))}"
            )
        if body["institution"] != member.id:
            raise InvalidSignature(
                f"patient.rebind for {body['institution']!r} signed by {member.id!r}"
            )
        hash_from_hex(body["patient"], "patient.rebind patient")
        hash_from_hex(body["previous"], "patient.rebind previous")
        if body["patient"] == body["previous"]:
            raise InvalidInput("patient.rebind must name a different key")
        if not isinstance(body["actor"], str) or not REBIND_ACTOR.fullmatch(body["actor"]):
            raise InvalidInput("patient.rebind actor must be 'admin:<token id>'")

    def _check_consent(self, tx: Transaction) -> None:
        if tx.type == CONSENT_GRANT:
            grant = ConsentGrant.from_tx(tx, verify_signature=self._verify)
            if self.members.by_id(grant.grantee) is None:
                raise InvalidInput(f"consent grantee {grant.grantee!r} is not a member")
            return
        revoke = ConsentRevoke.from_tx(tx, verify_signature=self._verify)
        record = self.consents.get(revoke.grant)
        if record is None or record.grant.patient != revoke.patient:
            raise InvalidInput("consent.revoke names no consent grant of this patient")
        if record.revoked_height is not None:
            raise InvalidInput("the consent was already revoked")

    def _check_membership(self, tx: Transaction) -> None:
        if not self._verify:
            self._membership_result(tx)
            return
        signers = self.members.quorum_signers(tx.signing_bytes(), tx.signatures)
        if len(signers) < self.members.quorum:
            raise InvalidSignature(
                f"{tx.type} needs {self.members.quorum} member signatures, has {len(signers)}"
            )
        self._membership_result(tx)

    def _membership_result(self, tx: Transaction) -> MemberSet:
        body = tx.body
        if tx.type == MEMBER_ADD:
            return self.members.with_member(Member.from_json(body.get("member")))
        if tx.type == MEMBER_REMOVE:
            return self.members.without(str(body.get("id")))
        if tx.type == MEMBER_TLS:
            tls_hex = body.get("tls_cert")
            if not isinstance(tls_hex, str):
                raise InvalidInput("member.tls tls_cert must be hex DER")
            return self.members.with_certificate(
                str(body.get("id")), MemberCertificate.from_hex(tls_hex)
            )
        key_hex = body.get("signing_key")
        if not isinstance(key_hex, str):
            raise InvalidInput("member.rotate needs signing_key (hex DER)")
        try:
            key = VerifyingKey.from_der(bytes.fromhex(key_hex))
        except ValueError:
            raise InvalidInput("member.rotate signing_key is not hex") from None
        hpke = body.get("hpke_key")
        tls_hex = body.get("tls_cert")
        if tls_hex is not None and not isinstance(tls_hex, str):
            raise InvalidInput("member.rotate tls_cert must be hex DER")
        return self.members.rotated(
            str(body.get("id")),
            key,
            hpke if isinstance(hpke, str) else None,
            MemberCertificate.from_hex(tls_hex) if tls_hex is not None else None,
        )

    # -- applying ------------------------------------------------------------------------

    def apply(self, tx: Transaction, tx_hash: bytes, height: int = 0) -> None:
        """Record an accepted tx (``check`` passed), ordered into block ``height``."""
        self.seen.add(tx_hash)
        if tx.type == ANCHOR:
            body = tx.body
            record = AnchorRecord(
                institution=body["institution"],
                height=body["height"],
                log_size=body["log_size"],
                log_root=bytes.fromhex(body["log_root"]),
                block_hash=bytes.fromhex(body["block_hash"]),
                tx_hash=tx_hash,
            )
            self.anchors[record.institution] = record
        elif tx.type in MEMBER_TYPES:
            self.members = self._membership_result(tx)
        elif tx.type == CONSENT_GRANT:
            grant = ConsentGrant.from_tx(tx, verify_signature=False)
            self.consents[tx_hash] = ConsentRecord(tx_hash=tx_hash, grant=grant, height=height)
        elif tx.type in CONSENT_TYPES:
            revoke = ConsentRevoke.from_tx(tx, verify_signature=False)
            self.consents[revoke.grant] = replace(
                self.consents[revoke.grant], revoked_height=height
            )

    def consents_of(self, patient: str) -> list[ConsentRecord]:
        """Every consent ``patient`` granted, oldest first, revoked ones included."""
        return sorted(
            (r for r in self.consents.values() if r.grant.patient == patient),
            key=lambda r: (r.height, r.grant.time_ms),
        )
