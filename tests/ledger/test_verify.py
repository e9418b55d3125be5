"""Tests for :mod:`medledger.ledger.verify`: a good chain passes, every tampering is caught.

Each tampering edits the SQLite file underneath the store with raw SQL, the
way an insider with file access would, then ``verify_chain`` must raise a
:class:`VerificationError` whose message starts with ``block {height}:`` for
the first block that no longer checks out. The one attack no signature can
catch — history rewritten and re-signed with the institution's own key — is
caught only with a previously published checkpoint.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
import sqlite3
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from chain_helpers import CHAIN, Chains, write_rounds

from medledger.core.encoding import canonical_bytes
from medledger.core.errors import (
    InconsistentLog,
    IntegrityError,
    InvalidInput,
    InvalidSignature,
    NotFound,
    VerificationError,
)
from medledger.core.hashing import sha256
from medledger.core.keys import SigningKey
from medledger.core.merkle import EMPTY_ROOT, NodeID
from medledger.core.models import BlockHeader, Signature
from medledger.ledger import verify as verify_module
from medledger.ledger.proofs import root_at
from medledger.ledger.verify import (
    STEPS,
    Checkpoint,
    VerifyReport,
    parse_checkpoint,
    verify_chain,
)
from medledger.storage.chain_layout import node_key
from medledger.storage.sqlite.chain import SqliteChainStore

ROUNDS = [3, 1, 5, 8, 2, 13, 1, 4, 6, 2]  # blocks 1..10; 45 txs + genesis = 46 entries
LAST = len(ROUNDS)


@dataclass
class Built:
    """A good chain on disk (store closed) and what it looked like."""

    chains: Chains
    path: Path
    key: SigningKey
    headers: list[BlockHeader]
    hashes: list[bytes]
    data: list[bytes]
    nodes: list[tuple[NodeID, bytes]]

    def height_of(self, index: int) -> int:
        """Height of the block holding log entry ``index``."""
        firsts = [h.log_size - h.tx_count for h in self.headers]
        return bisect_right(firsts, index) - 1

    def verify(self, **kwargs: Any) -> VerifyReport:
        return verify_chain(self.chains.open_store(self.path.name), **kwargs)

    def sql(self, query: str, args: Sequence[Any] = ()) -> list[Any]:
        conn = sqlite3.connect(self.path)
        try:
            rows = conn.execute(query, args).fetchall()
            conn.commit()
        finally:
            conn.close()
        return rows

    def expect(
        self,
        height: int,
        cls: type[VerificationError] = VerificationError,
        step: str | None = None,
        **kwargs: Any,
    ) -> VerificationError:
        """Verification fails at block ``height`` with ``cls``, in ``step`` when given."""
        with pytest.raises(cls) as caught:
            self.verify(**kwargs)
        message = str(caught.value)
        assert re.match(rf"private chain of [^,]+, block {height}: ", message), message
        if step is not None:
            assert caught.value.step == step, message
            assert message.endswith(f"(verify step: {step})"), message
        return caught.value


def build(chains: Chains, key: SigningKey, name: str, rounds: Sequence[int], tag: str) -> Built:
    chain = chains.create(key, name=name)

    async def write() -> None:
        try:
            await write_rounds(chain, rounds, tag=tag)
        finally:
            await chain.close()

    asyncio.run(write())
    store = chain.store
    blocks = list(store.iter_blocks())
    built = Built(
        chains=chains,
        path=chains.path(name),
        key=key,
        headers=[BlockHeader.decode(b.header_bytes) for b in blocks],
        hashes=[b.block_hash for b in blocks],
        data=[d for b in blocks for d in b.tx_data],
        nodes=list(store.iter_nodes()),
    )
    store.close()
    return built


@pytest.fixture
def built(chains: Chains, key: SigningKey) -> Built:
    return build(chains, key, "chain.db", ROUNDS, "good")


# -- a good chain -----------------------------------------------------------------------------


def test_a_good_chain_verifies_with_the_right_report(built: Built) -> None:
    progress: list[int] = []
    report = built.verify(expected_key=built.key.public, progress=progress.append)
    head = built.headers[-1]
    assert report == VerifyReport(
        chain=CHAIN,
        blocks=LAST + 1,
        log_size=sum(ROUNDS) + 1,
        log_root=head.log_root,
        head_hash=built.hashes[-1],
        signer=built.key.fingerprint,
        checkpoints=0,
    )
    assert progress == [h.log_size for h in built.headers]


def test_verification_writes_nothing(built: Built) -> None:
    before = built.path.read_bytes()
    built.verify(expected_key=built.key.public)
    built.chains.close_all()
    assert built.path.read_bytes() == before


def test_every_published_checkpoint_of_the_chain_verifies(built: Built) -> None:
    store = built.chains.open_store()
    size = len(built.data)
    checkpoints = [Checkpoint(size=s, root=root_at(store, s)) for s in range(1, size + 1)]
    checkpoints += [Checkpoint(size=h.log_size, root=h.log_root) for h in built.headers]
    report = verify_chain(store, expected_key=built.key.public, checkpoints=checkpoints[::-1])
    assert report.checkpoints == len(checkpoints)
    assert report.log_size == size


@pytest.mark.parametrize("size", [1, 2, 4, 5, 9, 17, 30, 46])
def test_a_wrong_root_at_a_checkpoint_is_inconsistent(built: Built, size: int) -> None:
    bad = Checkpoint(size=size, root=sha256(b"a different history"))
    error = built.expect(
        built.height_of(size - 1), InconsistentLog, "published-roots", checkpoints=[bad]
    )
    assert bad.root.hex() in str(error)


def test_a_checkpoint_beyond_the_head_means_truncation(built: Built) -> None:
    cp = Checkpoint(size=len(built.data) + 1, root=sha256(b"later"))
    with pytest.raises(InconsistentLog, match="truncated") as caught:
        built.verify(checkpoints=[cp])
    assert caught.value.step == "checkpoints"


def test_the_empty_checkpoint_is_consistent_with_every_chain(built: Built) -> None:
    """Size 0 with the empty root is a valid (trivial) published state: it must not fail."""
    cp = parse_checkpoint(f"0:{EMPTY_ROOT.hex()}")
    assert cp == Checkpoint(size=0, root=EMPTY_ROOT)
    report = built.verify(checkpoints=[cp])
    assert report.checkpoints == 1


def test_an_empty_store_is_not_found(tmp_path: Path) -> None:
    store = SqliteChainStore.create(tmp_path / "empty.db", CHAIN)
    try:
        with pytest.raises(NotFound):
            verify_chain(store)
    finally:
        store.close()


# -- tampering with transactions --------------------------------------------------------------


def _flip(data: bytes, mode: str) -> bytes:
    if mode == "xor-middle-byte":
        out = bytearray(data)
        out[len(out) // 2] ^= 0x01
        return bytes(out)
    # Still canonical JSON, just a different value: bump the last digit of time_ms.
    match = re.search(rb'"time_ms":(\d+)', data)
    assert match is not None
    end = match.end(1) - 1
    digit = (data[end] - ord("0") + 1) % 10
    return data[:end] + bytes([ord("0") + digit]) + data[end + 1 :]


@pytest.mark.parametrize("mode", ["xor-middle-byte", "canonical-value"])
@pytest.mark.parametrize("index", [0, 1, 9, 20, 45])
def test_a_changed_transaction_byte_is_caught(built: Built, index: int, mode: str) -> None:
    tampered = _flip(built.data[index], mode)
    assert tampered != built.data[index]
    built.sql("UPDATE txs SET data = ? WHERE idx = ?", (tampered, index))
    built.expect(built.height_of(index), IntegrityError)


@pytest.mark.parametrize("index", [1, 9, 20, 45])
def test_an_edited_block_is_named_even_where_an_anchor_ends_in_it(built: Built, index: int) -> None:
    """With every block's root published, the edit is still reported as the block's own."""
    anchors = [Checkpoint(size=h.log_size, root=h.log_root) for h in built.headers]
    built.sql(
        "UPDATE txs SET data = ? WHERE idx = ?",
        (_flip(built.data[index], "canonical-value"), index),
    )
    error = built.expect(built.height_of(index), IntegrityError, "roots", checkpoints=anchors)
    assert "tx_root does not match" in str(error)
    assert "history was rewritten" not in str(error)


def test_a_deleted_transaction_is_caught(built: Built) -> None:
    built.sql("DELETE FROM txs WHERE idx = ?", (20,))
    built.expect(built.height_of(20), IntegrityError, "transaction-positions")


# -- tampering with headers ----------------------------------------------------------------------


def _header_edit(field: str, value: Any) -> Any:
    if field in ("time_ms", "log_size", "height"):
        return value + 1
    if field == "tx_count":
        return value - 1 if value > 1 else value + 1
    if field in ("log_root", "tx_root", "prev_hash"):
        return sha256(bytes.fromhex(value)).hex()
    if field == "chain":
        return "private:mallory"
    assert field == "proposer"
    return "mallory"


#: What a changed field is caught as, and by which step of ``verify_chain``.
HEADER_FIELDS: dict[str, tuple[type[VerificationError], str]] = {
    "time_ms": (InvalidSignature, "signatures"),
    "proposer": (InvalidSignature, "signatures"),
    "log_root": (IntegrityError, "roots"),
    "tx_root": (IntegrityError, "roots"),
    "prev_hash": (IntegrityError, "link"),
    "tx_count": (IntegrityError, "transaction-positions"),
    "log_size": (IntegrityError, "roots"),
    "chain": (IntegrityError, "link"),
    "height": (IntegrityError, "header"),
}
#: Where genesis differs: its chain id is whatever its header says (so its transaction
#: disagrees), and one more transaction than its log holds is a malformed header.
GENESIS_HEADER_STEPS = {"chain": "transactions", "tx_count": "header"}


@pytest.mark.parametrize("height", [0, 4, LAST])
@pytest.mark.parametrize("field", sorted(HEADER_FIELDS))
def test_a_changed_header_field_with_a_recomputed_hash_is_caught(
    built: Built, field: str, height: int
) -> None:
    (raw,) = built.sql("SELECT header FROM blocks WHERE height = ?", (height,))[0]
    header = json.loads(raw)
    header[field] = _header_edit(field, header[field])
    new = canonical_bytes(header)
    built.sql("UPDATE blocks SET header = ?, hash = ? WHERE height = ?", (new, sha256(new), height))
    cls, step = HEADER_FIELDS[field]
    built.expect(height, cls, GENESIS_HEADER_STEPS.get(field, step) if height == 0 else step)


@pytest.mark.parametrize("height", [0, 6, LAST])
def test_a_changed_header_without_its_hash_is_caught(built: Built, height: int) -> None:
    (raw,) = built.sql("SELECT header FROM blocks WHERE height = ?", (height,))[0]
    header = json.loads(raw)
    header["time_ms"] += 1
    built.sql("UPDATE blocks SET header = ? WHERE height = ?", (canonical_bytes(header), height))
    built.expect(height, IntegrityError, "block-hash")


# -- removing, reordering blocks -------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 3, LAST - 1])
def test_deleting_the_last_blocks_leaves_detectable_remains(built: Built, keep: int) -> None:
    built.sql("DELETE FROM blocks WHERE height > ?", (keep,))
    built.expect(keep, IntegrityError, "head")


def test_deleting_a_middle_block_is_caught(built: Built) -> None:
    built.sql("DELETE FROM blocks WHERE height = 5")
    built.expect(5, IntegrityError, "block-order")


@pytest.mark.parametrize("keep", [1, 5, LAST - 1])
def test_a_clean_truncation_is_caught_only_by_a_checkpoint(built: Built, keep: int) -> None:
    kept = built.headers[keep]
    built.sql("DELETE FROM blocks WHERE height > ?", (keep,))
    built.sql("DELETE FROM txs WHERE idx >= ?", (kept.log_size,))
    built.sql("DELETE FROM nodes WHERE (id >> 6) >= ?", (kept.log_size,))

    report = built.verify(expected_key=built.key.public)
    assert (report.blocks, report.log_size, report.log_root) == (
        keep + 1,
        kept.log_size,
        kept.log_root,
    )
    assert report.head_hash == built.hashes[keep]
    # An earlier published state is still consistent...
    early = built.headers[1]
    assert built.verify(checkpoints=[Checkpoint(size=early.log_size, root=early.log_root)])
    # ...but the longer one that was published before the truncation is not.
    head = built.headers[-1]
    with pytest.raises(InconsistentLog, match="truncated"):
        built.verify(checkpoints=[Checkpoint(size=head.log_size, root=head.log_root)])


@pytest.mark.parametrize(("a", "b"), [(1, 2), (3, 7), (0, LAST), (LAST - 1, LAST)])
def test_swapped_block_rows_are_caught(built: Built, a: int, b: int) -> None:
    cols = "hash, header, signatures, first_index, tx_count"
    row_a = built.sql(f"SELECT {cols} FROM blocks WHERE height = ?", (a,))[0]
    row_b = built.sql(f"SELECT {cols} FROM blocks WHERE height = ?", (b,))[0]
    update = (
        "UPDATE blocks SET hash = ?, header = ?, signatures = ?, first_index = ?, tx_count = ?"
        " WHERE height = ?"
    )
    built.sql(update, (*row_b, a))
    built.sql(update, (*row_a, b))
    built.expect(a, IntegrityError)


# -- signatures ------------------------------------------------------------------------------------


def _signatures(built: Built, height: int) -> list[dict[str, str]]:
    (raw,) = built.sql("SELECT signatures FROM blocks WHERE height = ?", (height,))[0]
    sigs: list[dict[str, str]] = json.loads(raw)
    return sigs


def _set_signatures(built: Built, height: int, sigs: list[dict[str, str]]) -> None:
    built.sql(
        "UPDATE blocks SET signatures = ? WHERE height = ?",
        (json.dumps(sigs, separators=(",", ":")), height),
    )


@pytest.mark.parametrize("height", [0, 5, LAST])
@pytest.mark.parametrize("mode", ["last-byte", "middle-byte", "dropped", "other-key", "forged"])
def test_a_bad_signature_is_caught(built: Built, height: int, mode: str) -> None:
    sigs = _signatures(built, height)
    raw = bytearray(bytes.fromhex(sigs[0]["sig"]))
    other = SigningKey.generate()
    if mode == "last-byte":
        raw[-1] ^= 0x01
        sigs[0]["sig"] = raw.hex()
    elif mode == "middle-byte":
        raw[len(raw) // 2 + 4] ^= 0x80
        sigs[0]["sig"] = raw.hex()
    elif mode == "dropped":
        sigs = []
    elif mode == "other-key":
        sigs = [other.sign(built.hashes[height]).to_json()]
    else:  # another key's valid signature, claiming to be the institution's
        forged = other.sign(built.hashes[height])
        sigs = [Signature(signer=built.key.fingerprint, alg=forged.alg, sig=forged.sig).to_json()]
    _set_signatures(built, height, sigs)
    built.expect(height, InvalidSignature, "signatures")


def test_an_extra_cosignature_is_harmless(built: Built) -> None:
    other = SigningKey.generate()
    sigs = _signatures(built, 3)
    _set_signatures(built, 3, [other.sign(built.hashes[3]).to_json(), *sigs])
    assert built.verify(expected_key=built.key.public).blocks == LAST + 1


# -- Merkle nodes -----------------------------------------------------------------------------------


def _node_cases() -> list[NodeID]:
    return [NodeID(1, 0), NodeID(2, 1), NodeID(3, 1), NodeID(5, 0), NodeID(1, 22)]


@pytest.mark.parametrize("mode", ["edited", "deleted"])
@pytest.mark.parametrize("node", _node_cases(), ids=str)
def test_a_bad_stored_merkle_node_is_caught(built: Built, node: NodeID, mode: str) -> None:
    assert node in dict(built.nodes)
    last_leaf = ((node.index + 1) << node.level) - 1
    if mode == "edited":
        built.sql(
            "UPDATE nodes SET hash = ? WHERE id = ?", (sha256(b"forged node"), node_key(node))
        )
    else:
        built.sql("DELETE FROM nodes WHERE id = ?", (node_key(node),))
    built.expect(built.height_of(last_leaf), IntegrityError, "merkle-nodes")


# -- keys and rewritten history --------------------------------------------------------------------


def test_a_chain_signed_by_another_key_is_refused(chains: Chains, key: SigningKey) -> None:
    other = SigningKey.generate()
    built = build(chains, other, "other.db", [2, 3], "other")
    # On its own it is a valid chain, of the other key...
    assert built.verify().signer == other.fingerprint
    # ...but not of this institution.
    built.expect(0, InvalidSignature, "transactions", expected_key=key.public)


def test_history_rewritten_with_the_institution_key_needs_a_checkpoint(
    chains: Chains, key: SigningKey
) -> None:
    original = build(chains, key, "chain.db", ROUNDS, "original")
    mid = original.headers[4]
    published = [
        Checkpoint(size=mid.log_size, root=mid.log_root),
        Checkpoint(size=original.headers[-1].log_size, root=original.headers[-1].log_root),
    ]
    chains.close_all()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{original.path}{suffix}").unlink(missing_ok=True)

    # The insider rebuilds the chain at the same path, same id, same key: other contents.
    forged = build(chains, key, "chain.db", [*ROUNDS[:3], 9, 9, 9, 9, 9], "forged")
    assert forged.path == original.path
    assert forged.data[0] != original.data[0] or forged.data[5] != original.data[5]
    assert len(forged.data) > len(original.data)

    report = forged.verify(expected_key=key.public)
    assert report.signer == key.fingerprint  # every signature is genuine
    for cp in published:
        with pytest.raises(InconsistentLog, match="rewritten"):
            forged.verify(expected_key=key.public, checkpoints=[cp])
    first_diff = next(
        i for i, (a, b) in enumerate(zip(original.data, forged.data, strict=False)) if a != b
    )
    forged.expect(
        forged.height_of(published[0].size - 1),
        InconsistentLog,
        checkpoints=published[:1],
    )
    assert first_diff < published[0].size


# -- parse_checkpoint ---------------------------------------------------------------------------

ROOT = sha256(b"root")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"5:{ROOT.hex()}", Checkpoint(size=5, root=ROOT)),
        (f"0:{EMPTY_ROOT.hex()}", Checkpoint(size=0, root=EMPTY_ROOT)),
        (f"007:{ROOT.hex()}", Checkpoint(size=7, root=ROOT)),
        (f"{2**40}:{ROOT.hex()}", Checkpoint(size=2**40, root=ROOT)),
        (f"12:{ROOT.hex().upper()}", Checkpoint(size=12, root=ROOT)),
    ],
)
def test_parse_checkpoint_accepts(text: str, expected: Checkpoint) -> None:
    assert parse_checkpoint(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "5",
        ":",
        f":{ROOT.hex()}",
        "5:",
        f"-1:{ROOT.hex()}",
        f"+5:{ROOT.hex()}",
        f" 5:{ROOT.hex()}",
        f"5.0:{ROOT.hex()}",
        f"five:{ROOT.hex()}",
        f"0x5:{ROOT.hex()}",
        f"5:{ROOT.hex()[:-2]}",
        f"5:{ROOT.hex()}00",
        f"5:{ROOT.hex()[:-1]}",
        f"5:{'zz' * 32}",
        f"5:{ROOT.hex()}:extra",
        f"5;{ROOT.hex()}",
        f"²:{ROOT.hex()}",  # a Unicode digit that int() cannot read
    ],
)
def test_parse_checkpoint_refuses(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_checkpoint(text)


# -- the steps an auditor follows -------------------------------------------------------------------


def test_the_steps_are_documented_functions_taken_in_order() -> None:
    """``STEPS`` names each step once; each is one function with a docstring saying what it
    checks; ``verify_chain`` takes them in the order listed."""
    tree = ast.parse(Path(verify_module.__file__).read_text(encoding="utf-8"))
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    step_of = {
        name: decorator.args[0].value
        for name, fn in functions.items()
        for decorator in fn.decorator_list
        if isinstance(decorator, ast.Call)
        and isinstance(decorator.func, ast.Name)
        and decorator.func.id == "_step"
        and isinstance(decorator.args[0], ast.Constant)
    }
    assert sorted(step_of.values()) == sorted(STEPS) and len(set(STEPS)) == len(STEPS)
    assert all(ast.get_docstring(functions[name]) for name in step_of)
    # ast.walk is breadth-first: order the calls by where they are written.
    lines = sorted(
        (node.lineno, step_of[node.func.id])
        for node in ast.walk(functions["verify_chain"])
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in step_of
    )
    assert [step for _, step in lines] == list(STEPS)


def test_an_error_outside_a_whole_chain_verification_names_no_step() -> None:
    assert str(IntegrityError("block 3: something")) == "block 3: something"
