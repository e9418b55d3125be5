"""Cross-institution sharing: the holder's side and the reader's side of ``/peer/v1``.

Reader B asks holder A for a record under a patient's consent::

    B: PeerRequest(op, reader=B, holder=A, consent, resource, nonce, time) signed by B
    A: checks signature and membership, freshness (genesis ``max_clock_skew_ms``),
       nonce unseen, the consent final/unrevoked/unexpired/in scope for B and
       about the record's patient — then answers with the ciphertext, the data key
       HPKE-wrapped to B's published key, and the provenance (record tx, inclusion
       proof against A's latest final anchor, the anchor in a certified block)
    B: verifies every piece, then unwraps and decrypts.

A request whose signature or membership does not check is answered before
anything is written (``authenticate``): unauthenticated text never reaches a
chain. Past that, both sides write an ``access`` entry for every attempt,
allowed or refused, holding only values the node derived (member ids from the
genesis, hashes, fingerprints, keyed references, fixed reasons); A also
summarizes it on the consortium (see ``services.access``). A's refusals of one
member are recorded within a budget (:data:`PEER_REFUSALS`); past it they are
answered :class:`RateLimited` (429) and not recorded. Only after a
final revocation does A refuse; the consent is re-checked after the last
await before a response leaves, so no fetch is served once a revocation is final.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from medledger.core.consent import ConsentRecord
from medledger.core.consortium import MemberSet
from medledger.core.encoding import canonical_bytes
from medledger.core.envelope import RecordContext, open_record
from medledger.core.errors import (
    ConsentDenied,
    IntegrityError,
    InvalidInput,
    InvalidSignature,
    MedledgerError,
    NotFound,
    OrderingError,
    RateLimited,
    VerificationError,
)
from medledger.core.hashing import hash_from_hex, sha256
from medledger.core.keys import SigningKey
from medledger.core.models import BlockHeader, Transaction
from medledger.core.peer import (
    AnchorProof,
    PeerRequest,
    Provenance,
    SignedPeerRequest,
    share_info,
)
from medledger.core.tls import MemberCertificate
from medledger.ledger.clock import Clock, SystemClock
from medledger.ledger.consortium.member import ConsortiumMember
from medledger.ledger.private import PrivateChain
from medledger.ledger.proofs import inclusion_proof
from medledger.services.access import ALLOWED, REFUSED, AccessEntry, AccessLog, refusal_reason
from medledger.services.enrollment import EnrollmentService
from medledger.services.fhir import is_resource_type
from medledger.services.hpke import HpkeKeyPair, seal_to
from medledger.services.ratelimit import RateLimit, RateLimiter
from medledger.services.records.service import RecordsService
from medledger.storage.ports import ChainStore, NonceStore

__all__ = [
    "PEER_REFUSALS",
    "AuthenticatedRequest",
    "PeerTransport",
    "SharedRecord",
    "SharingService",
]

#: Refusals of one member recorded (and summarized on the consortium) before its
#: further refusals are answered 429 and not recorded: a reader retrying a revoked
#: consent stays well inside it; a member flooding bad requests adds at most one
#: entry a second to the chains.
PEER_REFUSALS = RateLimit(burst=100, interval_ms=1_000)
_ANCHOR_WAIT_S = 5.0
#: Anchor proofs whose check is remembered (one per holder and anchor is plenty).
_ANCHOR_CACHE = 64


class PeerTransport(Protocol):
    """Sends a signed request to a member's peer endpoint: ``(status, JSON body)``."""

    async def post(
        self, url: str, body: bytes, server_cert: MemberCertificate | None
    ) -> tuple[int, Any]:
        """POST to ``url``; over TLS, trust ``server_cert`` (the holder's pinned one) alone."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthenticatedRequest:
    """A peer request signed by a current member: made only by :meth:`SharingService.authenticate`."""

    signed: SignedPeerRequest


@dataclass(frozen=True, slots=True, kw_only=True)
class SharedRecord:
    """A resource fetched from another member, verified, with where it came from."""

    resource: dict[str, Any]
    provenance: dict[str, Any]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise IntegrityError(f"{what} is missing")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise IntegrityError(f"{what} is not base64") from None


class SharingService:
    """One member's sharing endpoints and client (see module docstring)."""

    def __init__(
        self,
        *,
        institution: str,
        key: SigningKey,
        hpke: HpkeKeyPair,
        records: RecordsService,
        chain: PrivateChain,
        member: ConsortiumMember,
        consortium_store: ChainStore,
        access: AccessLog,
        nonces: NonceStore,
        enrollments: EnrollmentService,
        transport: PeerTransport | None = None,
        clock: Clock | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
        refusal_limit: RateLimit = PEER_REFUSALS,
    ) -> None:
        self.institution = institution
        self._key = key
        self._hpke = hpke
        self._records = records
        self._chain = chain
        self._member = member
        self._cstore = consortium_store
        self._access = access
        self._nonces = nonces
        self._enrollments = enrollments
        self.transport = transport
        self._clock: Clock = clock or SystemClock()
        self._random = random_bytes
        self._refusals = RateLimiter(refusal_limit, self._clock)
        self._anchor_checks: dict[bytes, tuple[MemberSet, tuple[int, bytes], tuple[str, ...]]] = {}
        self._last_anchor_proof: tuple[bytes, AnchorProof] | None = None

    # -- enrollment -----------------------------------------------------------------

    async def patient_id(self, fingerprint: str) -> str | None:
        """The local Patient enrolled with key ``fingerprint`` now, if any."""
        return await self._enrollments.patient_id(fingerprint)

    # -- holder side ----------------------------------------------------------------

    def authenticate(self, document: Any, client_cert: bytes | None = None) -> AuthenticatedRequest:
        """``document`` as a peer request signed by a current member; writes nothing.

        ``client_cert`` is the DER certificate the request's TLS connection was
        authenticated with (None: none); it must be the signer's pinned
        certificate (``SignedPeerRequest.verify_channel``). Raises
        :class:`InvalidInput` (malformed) or :class:`InvalidSignature`
        (non-member, wrong key, altered body, another member's connection).
        Nothing about a request that fails here is recorded anywhere: its text
        is unauthenticated.
        """
        signed = SignedPeerRequest.from_json(document)
        members = self._member.state.members
        signed.verify(members)
        signed.verify_channel(members, client_cert)
        return AuthenticatedRequest(signed=signed)

    async def serve(self, op: str, authenticated: AuthenticatedRequest) -> dict[str, Any]:
        """Answer a member's authenticated request for ``op``; every outcome is an access entry.

        The entry holds only what this node derived: the verified reader's
        member id, the request hash, a consent hash once that consent is found
        final, the patient's fingerprint from it, a keyed record reference,
        and a fixed reason (:func:`~medledger.services.access.refusal_reason`).
        Refusals are recorded within the reader's refusal budget; past it the
        request is answered :class:`RateLimited` and nothing is written.

        Raises :class:`InvalidInput` (stale, replayed, misaddressed),
        :class:`ConsentDenied` (consent missing, revoked, expired, out of scope,
        for another grantee or patient), :class:`NotFound` / ``Gone``,
        :class:`RateLimited`.
        """
        request = authenticated.signed.request
        entry = AccessEntry(
            reader=request.reader,
            holder=self.institution,
            patient="",
            consent="",
            resource="",
            outcome=REFUSED,
            request=request.hash().hex(),
        )
        try:
            if request.holder != self.institution:
                raise InvalidInput("the request is addressed to another member")
            if request.op != op:
                raise InvalidInput("the request was sent to another operation's endpoint")
            now = self._clock.now_ms()
            skew = self._member.genesis.params.max_clock_skew_ms
            if abs(now - request.time_ms) > skew:
                raise InvalidInput(
                    f"the request timestamp is outside the allowed skew of {skew} ms"
                )
            await self._nonces.remember(
                request.reader, request.nonce, request.time_ms, forget_before_ms=now - skew
            )
            consent = self._consent(request)
            # Only now is the consent hash one this node knows, not just hex the reader chose.
            entry = _with(entry, consent=request.consent, patient=consent.grant.patient)
            self._authorize(request, consent)
            patient_id = await self.patient_id(consent.grant.patient)
            if patient_id is None:
                raise ConsentDenied("the consenting patient is not enrolled at this institution")
            if op == "list":
                entry = _with(entry, resource="list")
                answer = self._list(request, consent, patient_id)
            else:
                rtype, rid, _ = request.target
                if not is_resource_type(rtype):
                    raise InvalidInput("the requested resource type is not a FHIR resource type")
                entry = _with(entry, resource=f"{rtype}:{self._records.record_ref(rtype, rid)}")
                answer = await self._fetch(request, consent, patient_id)
            self._authorize(request, consent)
            await self._access.record(_with(entry, outcome=ALLOWED), summarize=True)
            # A revocation that became final while the entry was written wins.
            self._authorize(request, self._consent(request))
            return answer
        except MedledgerError as exc:
            wait_ms = self._refusals.spend(request.reader)
            if wait_ms:
                raise RateLimited(
                    "too many refused requests from this member; retry later",
                    retry_after_ms=wait_ms,
                ) from None
            reason = refusal_reason(exc)
            await self._access.record(_with(entry, reason=reason), summarize=True)
            if isinstance(exc, _NotSubject) and exc.subject:
                # The refused record's own patient sees the attempt too (decision 0009).
                await self._access.record(_with(entry, patient=exc.subject, reason=reason))
            raise

    def _consent(self, request: PeerRequest) -> ConsentRecord:
        record = self._member.state.consents.get(bytes.fromhex(request.consent))
        if record is None:
            raise ConsentDenied("no final consent with that hash on the consortium chain")
        return record

    def _authorize(self, request: PeerRequest, consent: ConsentRecord) -> None:
        """The consent lets the reader do this now (a list needs any type in scope)."""
        consent.authorize(
            reader=request.reader,
            patient=consent.grant.patient,
            resource_type=request.target[0] if request.op == "fetch" else consent.grant.scope[0],
            now_ms=self._clock.now_ms(),
        )

    def _list(
        self, request: PeerRequest, consent: ConsentRecord, patient_id: str
    ) -> dict[str, Any]:
        items = [
            {"resource": f"{rtype}/{rid}"}
            for rtype, rid in self._records.resources_of_patient(patient_id)
            if consent.grant.covers(rtype)
        ]
        return {"holder": self.institution, "consent": request.consent, "entries": items}

    async def _fetch(
        self, request: PeerRequest, consent: ConsentRecord, patient_id: str
    ) -> dict[str, Any]:
        rtype, rid, version = request.target
        sealed = await self._records.sealed_version(rtype, rid, version)
        about = (rtype == "Patient" and rid == patient_id) or sealed.row.patient == (
            self._records.patient_pseudonym(patient_id)
        )
        if not about:
            raise _NotSubject(
                "the consent's patient is not the subject of this record",
                subject=sealed.row.patient,
            )
        _, leaf_index = self._chain.store.tx_location(sealed.row.tx_hash)
        anchor = await self._anchor_covering(leaf_index)
        proof = inclusion_proof(self._chain.store, leaf_index, anchor.log_size)
        anchor_proof = self._anchor_proof(anchor.tx_hash)
        reader = self._member.state.members.by_id(request.reader)
        if reader is None or not reader.hpke_key:
            raise ConsentDenied("the reader has published no HPKE key")
        wrapped = seal_to(
            reader.hpke_key,
            sealed.dek,
            share_info(self.institution, request.reader, sealed.row.blob_hash, request.hash()),
        )
        provenance = Provenance(
            record_tx=Transaction.decode(sealed.tx_data),
            leaf_index=leaf_index,
            proof=tuple(proof),
            anchor=anchor_proof,
        )
        return {
            "resource": f"{rtype}/{rid}",
            "version": sealed.row.version,
            "ciphertext": _b64(sealed.blob),
            "wrapped_key": _b64(wrapped),
            "wrapped_for": reader.hpke_key,
            "provenance": provenance.to_json(),
        }

    async def local_provenance(
        self, resource_type: str, rid: str, version: int | None = None
    ) -> dict[str, Any]:
        """Where one of this node's own record versions stands, checked as a reader would.

        The private chain block and log position of its ``record.put``; once
        an anchor of this institution covers it, the consortium block that
        holds the anchor, when that block was cut, and the members whose
        signatures make it final. ``verified`` is the result of the same
        :meth:`Provenance.verify` a reader at another institution runs (record
        tx against the ciphertext, inclusion in the anchored log, the anchor in
        a block certified by a quorum); ``problem`` says what failed. Nothing
        of the record's content is in the answer. Raises :class:`NotFound` for
        an unknown, deleted or erased version.
        """
        sealed = await self._records.sealed_version(resource_type, rid, version)
        height, leaf_index = self._chain.store.tx_location(sealed.row.tx_hash)
        out: dict[str, Any] = {
            "resource": f"{resource_type}/{rid}",
            "version": sealed.row.version,
            "chain": self._chain.chain_id,
            "block": height,
            "record_tx": sealed.row.tx_hash.hex(),
            "leaf_index": leaf_index,
            "anchored": False,
            "verified": False,
        }
        anchor = self._member.state.anchors.get(self.institution)
        if anchor is None or anchor.log_size <= leaf_index or not anchor.tx_hash:
            out["problem"] = "not anchored on the consortium yet"
            return out
        anchor_proof = self._anchor_proof(anchor.tx_hash)
        out.update(
            anchored=True,
            consortium_chain=self._member.chain_id,
            consortium_height=anchor_proof.header.height,
            consortium_block=anchor_proof.header.hash().hex(),
            anchored_ms=anchor_proof.header.time_ms,
            anchored_log_size=anchor.log_size,
        )
        members = self._member.state.members
        try:
            anchored, certified_by = self._verified_anchor(anchor_proof, self.institution, members)
            Provenance(
                record_tx=Transaction.decode(sealed.tx_data),
                leaf_index=leaf_index,
                proof=tuple(inclusion_proof(self._chain.store, leaf_index, anchor.log_size)),
                anchor=anchor_proof,
            ).verify(
                consortium_chain=self._member.chain_id,
                holder=self.institution,
                members=members,
                resource_type=resource_type,
                version=sealed.row.version,
                blob=sealed.blob,
                anchored=anchored,
            )
        except VerificationError as exc:
            out["problem"] = str(exc)
            return out
        out.update(verified=True, certified_by=list(certified_by), quorum=members.quorum)
        return out

    def _anchor_proof(self, tx_hash: bytes) -> AnchorProof:
        """The anchor tx proven in its final consortium block (built once per anchor)."""
        if self._last_anchor_proof is not None and self._last_anchor_proof[0] == tx_hash:
            return self._last_anchor_proof[1]
        height, c_index = self._cstore.tx_location(tx_hash)
        block = self._cstore.block(height)
        header = BlockHeader.decode(block.header_bytes)
        anchor_proof = AnchorProof(
            tx=Transaction.decode(self._cstore.tx_by_hash(tx_hash)[1]),
            leaf_index=c_index,
            proof=tuple(inclusion_proof(self._cstore, c_index, header.log_size)),
            header=header,
            certificate=block.signatures,
        )
        self._last_anchor_proof = (tx_hash, anchor_proof)
        return anchor_proof

    async def _anchor_covering(self, leaf_index: int) -> Any:
        """This institution's latest final anchor, once it covers ``leaf_index``."""
        deadline = asyncio.get_running_loop().time() + _ANCHOR_WAIT_S
        while True:
            anchor = self._member.state.anchors.get(self.institution)
            if anchor is not None and anchor.log_size > leaf_index and anchor.tx_hash:
                return anchor
            if asyncio.get_running_loop().time() > deadline:
                raise OrderingError("the record is not anchored on the consortium yet; retry")
            await asyncio.sleep(0.02)

    # -- reader side ----------------------------------------------------------------

    def _request(self, op: str, holder: str, consent: str, resource: str) -> SignedPeerRequest:
        """A signed request to ``holder``, a member with a peer URL; raises before any write.

        What a caller asks for reaches this node's chain only in derived form
        (see :meth:`_entry`), so a request that names no member, no FHIR type or
        no well-formed consent is refused here and nothing is recorded.
        """
        hash_from_hex(consent, "consent")
        member = self._member.state.members.by_id(holder)
        if member is None or not member.peer_url:
            raise NotFound("the holder is not a consortium member with a peer URL")
        request = PeerRequest(
            op=op,
            reader=self.institution,
            holder=member.id,
            consent=consent,
            resource=resource,
            nonce=self._random(16).hex(),
            time_ms=self._clock.now_ms(),
        )
        if op == "fetch" and not is_resource_type(request.target[0]):
            raise InvalidInput("the requested resource type is not a FHIR resource type")
        return request.sign(self._key)

    def _entry(self, request: PeerRequest) -> AccessEntry:
        """The reader's refused-until-proven entry: derived values only.

        The consent hash and its patient appear only when the consent is final
        on this member's replica; otherwise the hex is the caller's, not a fact.
        """
        known = self._member.state.consents.get(bytes.fromhex(request.consent))
        if request.op == "fetch":
            rtype, rid, _ = request.target
            resource = f"{rtype}:{self._records.record_ref(rtype, rid)}"
        else:
            resource = "list"
        return AccessEntry(
            reader=self.institution,
            holder=request.holder,
            patient=known.grant.patient if known is not None else "",
            consent=request.consent if known is not None else "",
            resource=resource,
            outcome=REFUSED,
            request=request.hash().hex(),
        )

    async def _send(self, op: str, signed: SignedPeerRequest) -> Any:
        holder = self._member.state.members.by_id(signed.request.holder)
        if holder is None or not holder.peer_url:
            raise NotFound(f"{signed.request.holder!r} is not a member with a peer URL")
        if self.transport is None:
            raise OrderingError("this node has no peer transport")
        status, body = await self.transport.post(
            f"{holder.peer_url.rstrip('/')}/peer/v1/{op}",
            canonical_bytes(signed.to_json()),
            holder.tls_cert,
        )
        if status != 200:
            raise _refusal(status, body)
        return body

    async def list(self, holder: str, consent: str) -> list[str]:
        """Resources of the consenting patient at ``holder`` that the consent covers."""
        signed = self._request("list", holder, consent, "")
        entry = self._entry(signed.request)
        try:
            body = await self._send("list", signed)
            entries = body.get("entries") if isinstance(body, dict) else None
            if not isinstance(entries, list):
                raise IntegrityError(f"{holder} sent a malformed list")
            out = [str(e["resource"]) for e in entries if isinstance(e, dict) and "resource" in e]
        except MedledgerError as exc:
            await self._access.record(_with(entry, reason=refusal_reason(exc)))
            raise
        await self._access.record(_with(entry, outcome=ALLOWED))
        return out

    async def fetch(self, holder: str, consent: str, resource: str) -> SharedRecord:
        """Fetch ``resource`` (``Type/id[/_history/n]``) from ``holder`` and verify it."""
        signed = self._request("fetch", holder, consent, resource)
        rtype, rid, version = signed.request.target
        entry = self._entry(signed.request)
        try:
            body = await self._send("fetch", signed)
            shared = self._verify(signed.request, body, rtype, rid, version)
        except MedledgerError as exc:
            await self._access.record(_with(entry, reason=refusal_reason(exc)))
            raise
        await self._access.record(_with(entry, outcome=ALLOWED))
        return shared

    def _verify(
        self, request: PeerRequest, body: Any, rtype: str, rid: str, version: int | None
    ) -> SharedRecord:
        """Check everything the holder sent before any decryption (see module docstring)."""
        if not isinstance(body, dict):
            raise IntegrityError("the holder's answer is not a JSON object")
        holder = request.holder
        try:
            provenance = Provenance.from_json(body.get("provenance"))
        except MedledgerError as exc:
            raise IntegrityError(f"malformed provenance: {exc}") from None
        if body.get("resource") != f"{rtype}/{rid}" or not isinstance(body.get("version"), int):
            raise IntegrityError("the holder answered for another resource")
        got_version = int(body["version"])
        blob = _unb64(body.get("ciphertext"), "ciphertext")
        wrapped = _unb64(body.get("wrapped_key"), "wrapped key")
        state = self._member.state
        anchored, certified_by = self._verified_anchor(provenance.anchor, holder, state.members)
        provenance.verify(
            consortium_chain=self._member.chain_id,
            holder=holder,
            members=state.members,
            resource_type=rtype,
            version=version if version is not None else got_version,
            blob=blob,
            anchored=anchored,
        )
        if provenance.record_tx.body.get("version") != got_version:
            raise IntegrityError("the record transaction is for another version")
        self._check_own_copy(provenance.anchor.header)
        dek = self._hpke.open(
            str(body.get("wrapped_for", "")),
            wrapped,
            share_info(holder, self.institution, sha256(blob), request.hash()),
        )
        try:
            plain = open_record(
                dek,
                blob,
                RecordContext(institution=holder, resource_type=rtype, id=rid, version=got_version),
            )
            resource = json.loads(plain)
        except (MedledgerError, ValueError):
            raise IntegrityError("the ciphertext does not decrypt for this resource") from None
        if resource.get("resourceType") != rtype or resource.get("id") != rid:
            raise IntegrityError("the decrypted resource is not the one requested")
        anchor = provenance.anchor
        return SharedRecord(
            resource=resource,
            provenance={
                "holder": holder,
                "resource": f"{rtype}/{rid}",
                "version": got_version,
                "record_tx": provenance.record_tx.hash().hex(),
                "leaf_index": provenance.leaf_index,
                "anchored_log_size": anchor.tx.body.get("log_size"),
                "anchored_log_root": anchor.tx.body.get("log_root"),
                "consortium_height": anchor.header.height,
                "consortium_block": anchor.header.hash().hex(),
                "certified_by": [*certified_by],
                "kem": str(body.get("wrapped_for", "")).split(":", 1)[0],
                "consent": request.consent,
            },
        )

    def _verified_anchor(
        self, anchor: AnchorProof, holder: str, members: MemberSet
    ) -> tuple[tuple[int, bytes], tuple[str, ...]]:
        """:meth:`AnchorProof.verify` and the certifying members, per exact proof and member set.

        Until the holder's next anchor every record it shares is proven against
        the same certified block; its quorum signatures need checking once.
        """
        key = sha256(canonical_bytes(anchor.to_json()))
        cached = self._anchor_checks.get(key)
        if cached is not None and cached[0] is members:
            return cached[1], cached[2]
        result = anchor.verify(chain_id=self._member.chain_id, holder=holder, members=members)
        signers = tuple(
            sorted(
                members.certificate_signers(anchor.header.hash(), anchor.certificate, others=True)
            )
        )
        if len(self._anchor_checks) >= _ANCHOR_CACHE:
            self._anchor_checks.pop(next(iter(self._anchor_checks)))
        self._anchor_checks[key] = (members, result, signers)
        return result, signers

    def _check_own_copy(self, header: BlockHeader) -> None:
        """A block this member already holds must be the very block the holder cites."""
        head = self._cstore.head_header_bytes()
        if (
            head is not None
            and BlockHeader.decode(head).height >= header.height
            and self._cstore.block_hash(header.height) != header.hash()
        ):
            raise IntegrityError("the anchor block differs from this member's final block")


class _NotSubject(ConsentDenied):
    """A consent used for a record about another patient (``subject``, a keyed pseudonym)."""

    def __init__(self, message: str, *, subject: str | None) -> None:
        super().__init__(message)
        self.subject = subject


def _with(entry: AccessEntry, **changes: Any) -> AccessEntry:
    return replace(entry, **changes)


def _refusal(status: int, body: Any) -> MedledgerError:
    """The holder's OperationOutcome as the error it stands for."""
    text = ""
    if isinstance(body, dict):
        issues = body.get("issue")
        if isinstance(issues, list) and issues and isinstance(issues[0], dict):
            text = str(issues[0].get("diagnostics", ""))[:300]
    message = f"holder refused ({status}): {text or 'no reason given'}"
    if status == 403:
        return ConsentDenied(message)
    if status == 401:
        return InvalidSignature(message)
    if status == 429:
        return RateLimited(message, retry_after_ms=1_000)
    if status in (404, 410):
        return NotFound(message)
    if status >= 500:
        return OrderingError(message)
    return InvalidInput(message)
