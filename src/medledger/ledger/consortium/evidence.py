"""Equivocation evidence: a member's two signed votes for different blocks at one height.

A member that sees one member vote for two different blocks at one height
records the pair as evidence (``evidence.jsonl`` in the node directory, one
canonical JSON record per line)::

    {"member": id, "height": h,
     "votes": [{"header": {...}, "signature": {...}}, {"header": {...}, "signature": {...}}]}

The file is on disk, so it is hostile until checked: :func:`check_evidence`
holds a record to what makes it evidence — both headers name the consortium
chain and the record's height, their hashes differ, and each signature is by
the named member's key *as it was at that height* (the members who vote on
block ``h`` are those after block ``h-1``) and verifies over its header's hash
(the 32 raw bytes). A record that fails any of these accuses a member of
nothing; ``consortium status`` and ``verify --consortium`` report it as
tampering instead of showing it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medledger.core.consortium import MemberSet
from medledger.core.encoding import parse_canonical
from medledger.core.errors import IntegrityError, InvalidInput, InvalidSignature, MedledgerError
from medledger.core.models import BlockHeader, Signature

__all__ = ["EVIDENCE_FILE", "MAX_EVIDENCE_BYTES", "Evidence", "check_evidence", "read_evidence"]

#: The evidence file's name in a node directory.
EVIDENCE_FILE = "evidence.jsonl"
#: One record is about 1 KiB and a member is recorded once: a file this large is not ours.
MAX_EVIDENCE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Evidence:
    """Proof that ``member`` signed two different block headers at ``height``.

    Anyone can check it (:func:`check_evidence`): both headers name the same
    chain and height, differ, and the member's key signed the hash of each.
    """

    member: str
    height: int
    first_header: BlockHeader
    first: Signature
    second_header: BlockHeader
    second: Signature

    def to_json(self) -> dict[str, Any]:
        return {
            "member": self.member,
            "height": self.height,
            "votes": [
                {"header": self.first_header.to_json(), "signature": self.first.to_json()},
                {"header": self.second_header.to_json(), "signature": self.second.to_json()},
            ],
        }

    @classmethod
    def from_json(cls, value: Any) -> Evidence:
        """The record's structure (nothing is verified here: see :func:`check_evidence`)."""
        if not isinstance(value, dict) or set(value) != {"member", "height", "votes"}:
            raise InvalidInput("an evidence record has exactly member, height and votes")
        member, height, votes = value["member"], value["height"], value["votes"]
        if not isinstance(member, str) or type(height) is not int or height < 1:
            raise InvalidInput("evidence member must be a string and height an integer >= 1")
        if not isinstance(votes, list) or len(votes) != 2:
            raise InvalidInput("evidence has exactly two votes")
        parsed = []
        for vote in votes:
            if not isinstance(vote, dict) or set(vote) != {"header", "signature"}:
                raise InvalidInput("an evidence vote has exactly header and signature")
            parsed.append(
                (BlockHeader.from_json(vote["header"]), Signature.from_json(vote["signature"]))
            )
        (first_header, first), (second_header, second) = parsed
        return cls(
            member=member,
            height=height,
            first_header=first_header,
            first=first,
            second_header=second_header,
            second=second,
        )


def check_evidence(evidence: Evidence, *, chain_id: str, voters: MemberSet) -> None:
    """Raise unless ``evidence`` proves its member equivocated (see the module docstring).

    ``voters`` are the members who vote on block ``evidence.height``.
    """
    height = evidence.height
    member = voters.by_id(evidence.member)
    if member is None:
        raise InvalidSignature(
            f"{evidence.member!r} is no member voting at consortium height {height}"
        )
    for header in (evidence.first_header, evidence.second_header):
        if header.chain != chain_id or header.height != height:
            raise IntegrityError(f"a header is not of {chain_id} at height {height}")
    first_hash, second_hash = evidence.first_header.hash(), evidence.second_header.hash()
    if first_hash == second_hash:
        raise IntegrityError("both votes are for the same block")
    for sig, block_hash in ((evidence.first, first_hash), (evidence.second, second_hash)):
        if sig.signer != member.fingerprint:
            raise InvalidSignature(
                f"a vote is not signed by {member.id}'s key at consortium height {height}"
            )
        member.signing_key.verify(sig, block_hash)


def read_evidence(
    path: Path, *, chain_id: str, voters_at: Callable[[int], MemberSet]
) -> list[Evidence]:
    """Every record of the evidence file at ``path``, each checked; none if there is no file.

    Raises :class:`IntegrityError` naming the line of the first record that is not
    valid evidence (malformed, or failing :func:`check_evidence`).
    """
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_EVIDENCE_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise IntegrityError(f"{path.name}: cannot read ({exc.strerror})") from None
    if len(data) > MAX_EVIDENCE_BYTES:
        raise IntegrityError(f"{path.name}: larger than {MAX_EVIDENCE_BYTES} bytes")
    records = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line:
            continue
        try:
            evidence = Evidence.from_json(parse_canonical(line))
            check_evidence(evidence, chain_id=chain_id, voters=voters_at(evidence.height))
        except MedledgerError as exc:
            raise IntegrityError(
                f"{path.name} line {number} is not valid equivocation evidence: {exc}"
            ) from None
        records.append(evidence)
    return records
