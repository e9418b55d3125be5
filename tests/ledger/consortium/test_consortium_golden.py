"""medledger's own verifier agrees with the golden consortium (tests/golden/consortium/).

The independent re-derivation is ``tests/core/test_golden_consortium.py``; here
the same files pass ``verify --consortium-export``'s code, the evidence record
passes ``read_evidence``, hosp-a's private chain verifies against its anchors,
and a valid signature by a member who is not a voter of that block (added in
it, or removed before it) makes a certificate tampering.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from medledger.cli.consortium import verify_consortium_export
from medledger.core.errors import InvalidSignature
from medledger.ledger.consortium.evidence import read_evidence
from medledger.ledger.consortium.verify import anchored_checkpoints
from medledger.ledger.export import ExportedChain
from medledger.ledger.verify import verify_chain

GOLDEN = Path(__file__).parents[2] / "golden"
FILES = GOLDEN / "consortium"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_golden_consortium", GOLDEN / "make_golden_consortium.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_medledger_verifies_the_golden_consortium() -> None:
    report, policy, chain = verify_consortium_export(
        FILES / "consortium.jsonl", FILES / "genesis.json"
    )
    assert report.blocks == 5
    assert [m.id for m in policy.state.members.members] == ["hosp-a", "hosp-b", "hosp-d"]
    (evidence,) = read_evidence(
        FILES / "evidence.jsonl", chain_id=policy.genesis.chain_id, voters_at=policy.voters_at
    )
    assert (evidence.member, evidence.height) == ("hosp-b", 3)
    with (FILES / "private-hosp-a.jsonl").open("rb") as handle:
        private = ExportedChain(handle)
    checkpoints = anchored_checkpoints(chain, "hosp-a")
    assert verify_chain(private, checkpoints=checkpoints).checkpoints == 2


@pytest.mark.parametrize(
    ("height", "signer"),
    [(2, "hosp-d"), (4, "hosp-c")],
    ids=["added-in-that-block", "removed-before-it"],
)
def test_a_non_voters_valid_signature_is_tampering(
    tmp_path: Path, height: int, signer: str
) -> None:
    keys = _generator().KEYS
    lines = (FILES / "consortium.jsonl").read_bytes().splitlines()
    block = json.loads(lines[height])
    block["signatures"].append(keys[signer].sign(bytes.fromhex(block["hash"])).to_json())
    lines[height] = json.dumps(block).encode()
    edited = tmp_path / "edited.jsonl"
    edited.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(
        InvalidSignature, match=rf"block {height}: finality certificate carries a signature by key"
    ):
        verify_consortium_export(edited)


def test_the_generator_writes_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The golden files are deterministic: regenerating them changes nothing."""
    generator = _generator()
    monkeypatch.setattr(generator, "OUT", tmp_path)
    generator.main()
    for name in ("genesis.json", "consortium.jsonl", "private-hosp-a.jsonl", "evidence.jsonl"):
        assert (tmp_path / name).read_bytes() == (FILES / name).read_bytes(), name
