"""Consortium rules that every member (and any auditor) applies identically. Pure.

* Genesis document: consortium id, parameters and the founding members; the
  consortium chain's block 0 carries it as a ``consortium.genesis`` tx.
* Quorums: with n members, f = ⌊(n-1)/3⌋ may be Byzantine; a block is final
  with signatures from ⌊(n+f)/2⌋+1 distinct members (DESIGN.md, "Finality").
* Membership changes (``member.add``, ``member.remove``, ``member.rotate``)
  need that same quorum of *current* members' signatures.
* ``params.mode`` is ``"hybrid"`` (the product) or ``"consortium-only"``: a
  benchmark-only consortium whose members also order and finalize every
  record transaction (docs/decisions/0011-consortium-only-mode.md). It is
  written into the genesis only when not ``"hybrid"``, so hybrid genesis
  documents, and their hashes, are unchanged.
* Block time (``block_time``): the lower median of the voting members' latest
  signed clock readings, never before the previous block and never more than
  ``max_clock_skew_ms`` after the block's newest transaction. A minority of
  members (one of two, one of three, ...) cannot move it forward with a wrong
  clock; an auditor checks the part it can re-derive (``block_time_bound``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from medledger.core.encoding import canonical_bytes
from medledger.core.errors import InvalidInput, InvalidSignature, MedledgerError
from medledger.core.hashing import sha256
from medledger.core.keys import VerifyingKey
from medledger.core.tls import MemberCertificate
from medledger.core.transactions import CONSORTIUM_GENESIS

__all__ = [
    "CONSORTIUM_GENESIS",
    "CONSORTIUM_ONLY",
    "HYBRID",
    "ConsortiumParams",
    "Genesis",
    "Member",
    "MemberSet",
    "block_time",
    "block_time_bound",
    "clock_bytes",
    "consortium_chain_id",
    "idle_notice_bytes",
    "max_faulty",
    "quorum",
]

#: Consortium modes (``ConsortiumParams.mode``).
HYBRID, CONSORTIUM_ONLY = "hybrid", "consortium-only"


def max_faulty(n: int) -> int:
    """f = ⌊(n-1)/3⌋: how many Byzantine members ``n`` members tolerate."""
    if n < 1:
        raise InvalidInput("a consortium needs at least one member")
    return (n - 1) // 3


def quorum(n: int) -> int:
    """⌊(n+f)/2⌋+1 signatures make a block final among ``n`` members."""
    return (n + max_faulty(n)) // 2 + 1


def clock_bytes(chain_id: str, height: int, time_ms: int) -> bytes:
    """What a member signs to report its clock reading with its vote for block ``height``."""
    return canonical_bytes(
        {"chain": chain_id, "kind": "clock", "height": height, "time_ms": time_ms}
    )


def idle_notice_bytes(chain_id: str, height: int, time_ms: int) -> bytes:
    """What a member signs to say it had nothing new to anchor at ``time_ms`` (its
    anchor slot), for block ``height``.

    The ``kind`` keeps these bytes apart from a cut marker's (``"cut"``), a clock
    reading's (``"clock"``) and a vote (a bare block hash): no signature made for
    one of them checks as another.
    """
    return canonical_bytes(
        {"chain": chain_id, "kind": "idle", "height": height, "time_ms": time_ms}
    )


def block_time_bound(prev_time_ms: int, tx_times: Sequence[int], skew_ms: int) -> int:
    """The latest time a block may carry: ``skew_ms`` after its newest transaction.

    (Or the previous block's time, if that is later: block time never goes back.)
    Every honest block meets it, so an auditor rejects a block beyond it.
    """
    return max(prev_time_ms, max(tx_times, default=prev_time_ms) + skew_ms)


def block_time(
    prev_time_ms: int, readings: Sequence[int], tx_times: Sequence[int], skew_ms: int
) -> int:
    """The time of the next block, from the ordered stream alone (identical for every member).

    ``readings`` holds one clock reading per voting member (its latest signed one,
    or the genesis time if it has none yet). Their *lower* median is a time that
    at least half the members' clocks had reached, so members with fast clocks
    cannot push it forward unless they are more than half; it is then capped at
    :func:`block_time_bound` and never goes below the previous block's time.
    """
    if not readings:
        raise InvalidInput("block time needs at least one member's clock reading")
    ordered = sorted(readings)
    median = ordered[(len(ordered) - 1) // 2]
    return max(prev_time_ms, min(median, block_time_bound(prev_time_ms, tx_times, skew_ms)))


def consortium_chain_id(consortium: str) -> str:
    return f"consortium:{consortium}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Member:
    """A member institution as the consortium knows it.

    ``tls_cert`` is the member's pinned, self-signed TLS certificate (``core.tls``),
    or ``None`` for a member without one (a consortium formed before TLS). It is
    written to JSON only when present, so older genesis documents, and their
    hashes, are unchanged.
    """

    id: str
    name: str
    signing_key: VerifyingKey
    hpke_key: str = ""  # hex public key for sharing (empty until the member publishes one)
    peer_url: str = ""
    tls_cert: MemberCertificate | None = None

    @property
    def fingerprint(self) -> str:
        return self.signing_key.fingerprint

    def to_json(self) -> dict[str, Any]:
        out = {
            "id": self.id,
            "name": self.name,
            "signing_key": self.signing_key.der().hex(),
            "hpke_key": self.hpke_key,
            "peer_url": self.peer_url,
        }
        if self.tls_cert is not None:
            out["tls_cert"] = self.tls_cert.hex()
        return out

    @classmethod
    def from_json(cls, value: Any) -> Member:
        fields = {"id", "name", "signing_key", "hpke_key", "peer_url"}
        if not isinstance(value, dict) or not fields <= set(value) <= {*fields, "tls_cert"}:
            raise InvalidInput(
                "member must have exactly id, name, signing_key, hpke_key, peer_url"
                " and optionally tls_cert"
            )
        if not all(isinstance(value[k], str) for k in value) or not value["id"]:
            raise InvalidInput("member fields must be strings and id non-empty")
        try:
            key = VerifyingKey.from_der(bytes.fromhex(value["signing_key"]))
        except ValueError:
            raise InvalidInput(f"member {value['id']}: signing_key is not hex") from None
        tls_cert = None
        if "tls_cert" in value:
            try:
                tls_cert = MemberCertificate.from_hex(value["tls_cert"])
            except InvalidInput as exc:
                raise InvalidInput(f"member {value['id']}: {exc}") from None
        return cls(
            id=value["id"],
            name=value["name"],
            signing_key=key,
            hpke_key=value["hpke_key"],
            peer_url=value["peer_url"],
            tls_cert=tls_cert,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsortiumParams:
    """Block cutting and anchoring parameters, fixed in the genesis document."""

    max_block_txs: int = 500
    max_block_bytes: int = 1024 * 1024
    cut_after_ms: int = 20
    anchor_interval_ms: int = 200
    max_clock_skew_ms: int = 30_000
    #: ``HYBRID``, or ``CONSORTIUM_ONLY`` for the benchmark comparison only.
    mode: str = HYBRID
    #: Cut a block as soon as every member that anchored in the previous block with
    #: anchors has anchored again (decision 0053), without waiting ``cut_after_ms``
    #: and a cut marker. On in every new genesis; a document written before this
    #: parameter existed lacks it and keeps the old rule, so its stream replays to
    #: the same blocks.
    anchor_round_cut: bool = True
    #: With ``anchor_round_cut``: a member with nothing new to anchor at a slot sends
    #: a signed idle notice for the pending block, and the round is also complete
    #: when every member of it has an anchor, or a notice from the slot of the
    #: newest anchor, there (decision 0066). On
    #: in every new genesis; absent means off, as for ``anchor_round_cut``.
    anchor_idle_notice: bool = True
    #: The fields a genesis document wrote (``from_json``), or ``None``: every field
    #: (and ``mode`` if not hybrid). A document written before a parameter existed
    #: lacks it; its block 0 carries the document as written, so ``to_json`` writes
    #: back exactly those fields (the omitted ones take their defaults).
    written: frozenset[str] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in (HYBRID, CONSORTIUM_ONLY):
            raise InvalidInput(f"params mode must be {HYBRID!r} or {CONSORTIUM_ONLY!r}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "max_block_txs": self.max_block_txs,
            "max_block_bytes": self.max_block_bytes,
            "cut_after_ms": self.cut_after_ms,
            "anchor_interval_ms": self.anchor_interval_ms,
            "max_clock_skew_ms": self.max_clock_skew_ms,
        }
        if self.mode != HYBRID or (self.written is not None and "mode" in self.written):
            out["mode"] = self.mode
        if self.anchor_round_cut or (
            self.written is not None and "anchor_round_cut" in self.written
        ):
            out["anchor_round_cut"] = self.anchor_round_cut
        if self.anchor_idle_notice or (
            self.written is not None and "anchor_idle_notice" in self.written
        ):
            out["anchor_idle_notice"] = self.anchor_idle_notice
        if self.written is not None:
            out = {k: v for k, v in out.items() if k in self.written}
        return out

    @classmethod
    def from_json(cls, value: Any) -> ConsortiumParams:
        defaults = cls().to_json()
        if not isinstance(value, dict) or set(value) - {*defaults, "mode"}:
            raise InvalidInput("params has unknown fields")
        merged = {**defaults, **value}
        mode = merged.pop("mode", HYBRID)
        if not isinstance(mode, str):
            raise InvalidInput("params mode must be a string")
        # Absent means the rule from before the parameter existed: off.
        switches: dict[str, bool] = {}
        for name in ("anchor_round_cut", "anchor_idle_notice"):
            merged.pop(name)
            switch = value.get(name, False)
            if not isinstance(switch, bool):
                raise InvalidInput(f"params {name} must be true or false")
            switches[name] = switch
        if not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in merged.values()
        ):
            raise InvalidInput("params must be positive integers")
        return cls(**merged, mode=mode, **switches, written=frozenset(value))


@dataclass(frozen=True, slots=True, kw_only=True)
class Genesis:
    """The consortium's founding document."""

    consortium: str
    time_ms: int
    members: tuple[Member, ...]
    params: ConsortiumParams = field(default_factory=ConsortiumParams)

    def __post_init__(self) -> None:
        if not self.consortium or not self.members:
            raise InvalidInput("genesis needs a consortium id and at least one member")
        ids = [m.id for m in self.members]
        keys = [m.fingerprint for m in self.members]
        if len(set(ids)) != len(ids) or len(set(keys)) != len(keys):
            raise InvalidInput("genesis members must have distinct ids and keys")
        certs = [m.tls_cert.fingerprint for m in self.members if m.tls_cert is not None]
        if len(set(certs)) != len(certs):
            raise InvalidInput("genesis members must have distinct TLS certificates")

    @property
    def chain_id(self) -> str:
        return consortium_chain_id(self.consortium)

    def to_json(self) -> dict[str, Any]:
        return {
            "consortium": self.consortium,
            "time_ms": self.time_ms,
            "params": self.params.to_json(),
            "members": [m.to_json() for m in self.members],
        }

    def hash(self) -> bytes:
        return sha256(canonical_bytes(self.to_json()))

    @classmethod
    def from_json(cls, value: Any) -> Genesis:
        if not isinstance(value, dict) or set(value) != {
            "consortium",
            "time_ms",
            "params",
            "members",
        }:
            raise InvalidInput("genesis must have exactly consortium, time_ms, params, members")
        time_ms = value["time_ms"]
        if not isinstance(value["consortium"], str) or type(time_ms) is not int or time_ms < 0:
            raise InvalidInput("genesis consortium must be a string and time_ms an integer >= 0")
        if not isinstance(value["members"], list):
            raise InvalidInput("genesis members must be a list")
        return cls(
            consortium=value["consortium"],
            time_ms=value["time_ms"],
            params=ConsortiumParams.from_json(value["params"]),
            members=tuple(Member.from_json(m) for m in value["members"]),
        )


def _verifies(member: Member, signature: Any, message: bytes) -> bool:
    try:
        member.signing_key.verify(signature, message)
    except MedledgerError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class MemberSet:
    """The active members at some height, with lookups by id and key fingerprint."""

    members: tuple[Member, ...]
    # Every vote, anchor and marker is looked up by its signer's fingerprint: with
    # N members that is N lookups per message, so an index rather than a scan.
    _by_fingerprint: dict[str, Member] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[str, Member] = {}
        for m in self.members:
            index.setdefault(m.fingerprint, m)  # the first, as the scan found it
        object.__setattr__(self, "_by_fingerprint", index)

    def by_id(self, member_id: str) -> Member | None:
        return next((m for m in self.members if m.id == member_id), None)

    def by_fingerprint(self, fingerprint: str) -> Member | None:
        return self._by_fingerprint.get(fingerprint)

    def by_certificate(self, fingerprint: str) -> Member | None:
        """The member whose pinned TLS certificate has this (DER SHA-256) fingerprint."""
        return next(
            (
                m
                for m in self.members
                if m.tls_cert is not None and m.tls_cert.fingerprint == fingerprint
            ),
            None,
        )

    def tls_certificates(self) -> tuple[MemberCertificate, ...]:
        """Every current member's pinned TLS certificate (the consortium's trust anchors)."""
        return tuple(m.tls_cert for m in self.members if m.tls_cert is not None)

    @property
    def quorum(self) -> int:
        return quorum(len(self.members))

    def quorum_signers(self, message: bytes, signatures: Any) -> set[str]:
        """Ids of distinct current members whose signature over ``message`` verifies."""
        signers: set[str] = set()
        for sig in signatures:
            member = self.by_fingerprint(sig.signer)
            if member is not None and member.id not in signers and _verifies(member, sig, message):
                signers.add(member.id)
        return signers

    def certificate_signers(
        self, message: bytes, signatures: Any, *, others: bool = False
    ) -> set[str]:
        """Ids of the members who signed ``message``, every signature checked (strict).

        Raises :class:`InvalidSignature` if a signature does not verify under the key
        of the member whose fingerprint it names, if one member signed twice, or (unless
        ``others``) if it names a key that is no member's. A certificate a member
        assembles holds only its voters' verified votes, so anything else in it was
        put there afterwards. ``others`` ignores unknown signers instead: for a
        certificate checked against a later member set, whose signers may since have
        left or rotated their key.
        """
        signers: set[str] = set()
        for sig in signatures:
            member = self.by_fingerprint(sig.signer)
            if member is None:
                if others:
                    continue
                raise InvalidSignature(
                    f"a signature by key {sig.signer[:16]}… that is no voting member's"
                )
            if member.id in signers:
                raise InvalidSignature(f"two signatures by member {member.id}")
            if not _verifies(member, sig, message):
                raise InvalidSignature(f"a signature by member {member.id} that does not verify")
            signers.add(member.id)
        return signers

    def with_member(self, member: Member) -> MemberSet:
        if self.by_id(member.id) or self.by_fingerprint(member.fingerprint):
            raise InvalidInput(f"member {member.id} (or its key) is already in the consortium")
        if member.tls_cert is not None and self.by_certificate(member.tls_cert.fingerprint):
            raise InvalidInput(f"member {member.id}'s TLS certificate belongs to a member")
        return MemberSet((*self.members, member))

    def without(self, member_id: str) -> MemberSet:
        if self.by_id(member_id) is None:
            raise InvalidInput(f"{member_id} is not a member")
        if len(self.members) == 1:
            raise InvalidInput("the last member cannot be removed")
        return MemberSet(tuple(m for m in self.members if m.id != member_id))

    def with_certificate(self, member_id: str, tls_cert: MemberCertificate) -> MemberSet:
        """``member_id`` with a new pinned TLS certificate (``member.tls``), keys unchanged."""
        old = self.by_id(member_id)
        if old is None:
            raise InvalidInput(f"{member_id} is not a member")
        if self.by_certificate(tls_cert.fingerprint):
            raise InvalidInput("that TLS certificate already belongs to a member")
        new = replace(old, tls_cert=tls_cert)
        return MemberSet(tuple(new if m.id == member_id else m for m in self.members))

    def rotated(
        self,
        member_id: str,
        key: VerifyingKey,
        hpke_key: str | None = None,
        tls_cert: MemberCertificate | None = None,
    ) -> MemberSet:
        """``member_id`` with a new signing key (and HPKE key and TLS certificate, if given)."""
        old = self.by_id(member_id)
        if old is None:
            raise InvalidInput(f"{member_id} is not a member")
        if self.by_fingerprint(key.fingerprint):
            raise InvalidInput("that key already belongs to a member")
        if tls_cert is not None and self.by_certificate(tls_cert.fingerprint):
            raise InvalidInput("that TLS certificate already belongs to a member")
        new = replace(
            old,
            signing_key=key,
            hpke_key=old.hpke_key if hpke_key is None else hpke_key,
            tls_cert=old.tls_cert if tls_cert is None else tls_cert,
        )
        return MemberSet(tuple(new if m.id == member_id else m for m in self.members))
