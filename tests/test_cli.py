"""End-to-end tests of the ``medledger`` command line.

Commands run in this process through the CLI's entry point
(``cli_support.run_in_process``: same output and exit status as the console
script); ``node init``, ``chain show``, ``verify``, ``--version`` and
``--help`` also run as the installed console script in a subprocess.

One node is created per module through ``medledger node init`` (default scrypt
cost) and filled with transactions through the Python API; tests that modify a
node work on a ``shutil.copytree`` copy. Every CLI output is checked against
the raw rows of ``chain.db`` and against independent re-derivations (hashlib
RFC 6962 reference, ``cryptography`` ECDSA verification), never against the
code under test alone.

The CLI contract checked throughout: a failure is exactly one ``error: …``
line on stderr (or click's usage message with exit status 2), a non-zero exit
status (3 when ``verify`` finds tampering), no traceback, and nothing in the
node directory modified.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cli_support import medledger_command, run_in_process
from medledger.core.encoding import canonical_bytes
from medledger.core.errors import KeyStoreError
from medledger.core.merkle import leaf_hash, verify_consistency, verify_inclusion
from medledger.node import open_node

PASSPHRASE = "correct horse battery staple"
PASSPHRASE_ENV = "MEDLEDGER_PASSPHRASE"
NAME = "St. Mary Hospital"
INSTITUTION = "st-mary-hospital"
CHAIN = f"private:{INSTITUTION}"
EMPTY_ROOT = hashlib.sha256(b"").digest()
HEADER_KEYS = {
    "chain",
    "height",
    "prev_hash",
    "tx_root",
    "tx_count",
    "log_size",
    "log_root",
    "time_ms",
    "proposer",
}
#: Transactions per wave submitted concurrently; MEDLEDGER_MAX_TXS=4 while
#: filling makes each wave span several blocks.
WAVES = (1, 3, 7, 12, 20, 1, 1, 5)
MAX_TXS_WHILE_FILLING = "4"
#: Non-ASCII text in every record body: canonical bytes are UTF-8, never \u-escaped.
NOTE = "Genève ✓ \u2013 ü"


# -- running the CLI ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    args: tuple[str, ...]
    code: int
    out: str
    err: str


def run_cli(
    *args: str | Path,
    passphrase: str | None = PASSPHRASE,
    extra_env: dict[str, str] | None = None,
    process: bool = False,
) -> Run:
    """Run ``medledger ARGS`` with stdin closed; never a traceback, whatever happens.

    In this process (``cli_support.run_in_process``) unless ``process``: then
    the installed console script in a subprocess, as a user runs it.
    """
    env = {PASSPHRASE_ENV: passphrase} if passphrase is not None else {}
    env.update(extra_env or {})
    argv = tuple(str(a) for a in args)
    if process:
        proc = subprocess.run(
            [*medledger_command(), *argv],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("MEDLEDGER_")}, **env},
            timeout=120,
            check=False,
        )
        run = Run(argv, proc.returncode, proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8"))
    else:
        done = run_in_process(argv, env=env)
        run = Run(argv, done.code, done.out, done.err)
    assert "Traceback" not in run.out + run.err, run
    return run


def ok(*args: str | Path, **kwargs: Any) -> Run:
    """Run the CLI and require success with a silent stderr."""
    run = run_cli(*args, **kwargs)
    assert run.code == 0, run
    assert run.err == "", run
    return run


def assert_error_line(run: Run, code: int = 1, starts: str = "error: ") -> str:
    """Exactly one ``error: …`` line on stderr, nothing on stdout, exit ``code``."""
    assert run.code == code, run
    assert run.out == "", run
    lines = run.err.splitlines()
    assert len(lines) == 1, run
    assert run.err.endswith("\n"), run
    assert lines[0].startswith(starts), run
    return lines[0]


def assert_usage_error(run: Run) -> None:
    """Click's usage message: exit 2, ``Usage:`` and ``Error:`` on stderr, nothing on stdout."""
    assert run.code == 2, run
    assert run.out == "", run
    assert "Error:" in run.err, run
    lines = [line for line in run.err.splitlines() if line]
    assert lines[-1].startswith("Error: "), run
    assert sum(line.startswith("Error:") for line in lines) == 1, run


def assert_tampered(run: Run, height: int) -> str:
    """``verify`` found tampering and names the chain and ``height``: one line, exit 3."""
    label = "private chain of " + CHAIN.removeprefix("private:")
    return assert_error_line(run, 3, f"error: verification FAILED: {label}, block {height}: ")


# -- independent references -------------------------------------------------------------


def ref_root(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962 §2.1 MTH straight from the definition, over leaf *hashes*."""
    n = len(leaves)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaves[0]
    k = 1 << ((n - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + ref_root(leaves[:k]) + ref_root(leaves[k:])).digest()


def ref_leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative name) with the SHA-256 of its bytes."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "<dir>"
        for p in sorted(root.rglob("*"))
    }


def load_public_key(pem: str) -> ec.EllipticCurvePublicKey:
    key = serialization.load_pem_public_key(pem.encode("ascii"))
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert isinstance(key.curve, ec.SECP256R1)
    return key


def spki_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


# -- the module's node ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlockRow:
    """A block as stored in ``chain.db``, read with plain sqlite3."""

    height: int
    hash: bytes
    header: bytes
    signatures: str
    first_index: int
    tx_count: int


@dataclass(frozen=True, slots=True)
class Base:
    """The module's node and the truth about it read straight from its files."""

    root: Path
    init: Run
    blocks: tuple[BlockRow, ...]
    txs: tuple[bytes, ...]

    @property
    def head(self) -> BlockRow:
        return self.blocks[-1]

    @property
    def log_size(self) -> int:
        return len(self.txs)

    def leaves(self, size: int | None = None) -> list[bytes]:
        return [ref_leaf(d) for d in self.txs[: self.log_size if size is None else size]]

    def block_of(self, index: int) -> int:
        """Height of the block holding log index ``index``."""
        for b in self.blocks:
            if b.first_index <= index < b.first_index + b.tx_count:
                return b.height
        raise AssertionError(f"no block holds index {index}")


def read_db(db: Path) -> tuple[tuple[BlockRow, ...], tuple[bytes, ...]]:
    # Read-write on purpose: a read-only connection leaves chain.db-wal/-shm behind.
    conn = sqlite3.connect(db)
    try:
        blocks = tuple(
            BlockRow(h, bytes(hh), bytes(hd), s, f, c)
            for h, hh, hd, s, f, c in conn.execute(
                "SELECT height, hash, header, signatures, first_index, tx_count"
                " FROM blocks ORDER BY height"
            )
        )
        txs = tuple(bytes(d) for (d,) in conn.execute("SELECT data FROM txs ORDER BY idx"))
    finally:
        conn.close()
    return blocks, txs


async def _fill(root: Path, waves: Sequence[int], tag: str) -> None:
    node = open_node(root, PASSPHRASE.encode())
    try:
        n = 0
        for size in waves:
            await asyncio.gather(
                *(
                    node.chain.submit(
                        "record.put",
                        {
                            "resource": "Patient",
                            "id": f"{tag}{n + i}",
                            "version": n + i,
                            "note": NOTE,
                            "digest": hashlib.sha256(f"{tag}{n + i}".encode()).hexdigest(),
                        },
                    )
                    for i in range(size)
                )
            )
            n += size
    finally:
        await node.close()


def fill(root: Path, waves: Sequence[int], tag: str = "p") -> None:
    """Append ``sum(waves)`` record.put transactions, each wave written concurrently."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDLEDGER_MAX_TXS", MAX_TXS_WHILE_FILLING)
        asyncio.run(_fill(root, waves, tag))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    root = tmp_path_factory.mktemp("cli") / "st-mary"
    init = run_cli("node", "init", "--dir", root, "--name", NAME, process=True)
    assert init.code == 0, init
    fill(root, WAVES)
    blocks, txs = read_db(root / "chain.db")
    assert len(txs) == 1 + sum(WAVES)
    assert len(blocks) >= 2 + sum(WAVES) // int(MAX_TXS_WHILE_FILLING)
    assert not any(p.name.startswith("chain.db-") for p in root.iterdir())
    return Base(root=root, init=init, blocks=blocks, txs=txs)


@pytest.fixture
def node_copy(base: Base, tmp_path: Path) -> Base:
    """A private copy of the module's node, for tests that change it."""
    root = tmp_path / "copy"
    shutil.copytree(base.root, root)
    return Base(root=root, init=base.init, blocks=base.blocks, txs=base.txs)


@pytest.fixture
def unchanged(base: Base) -> Iterator[None]:
    """Fail if the test modified any file of the module's node."""
    before = snapshot(base.root)
    yield
    assert snapshot(base.root) == before


@cache
def _exported(root: Path) -> tuple[str, ...]:
    run = ok("chain", "export", "--dir", root)
    return tuple(run.out.splitlines())


def exported(base: Base) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _exported(base.root)]


def sql(db: Path, statement: str, params: Sequence[Any] = ()) -> None:
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.execute(statement, params)
    finally:
        conn.close()


# -- node init / node show --------------------------------------------------------------


def test_node_init_creates_node_files_and_prints_the_fingerprint(base: Base) -> None:
    assert base.init.err == ""
    assert {p.name for p in base.root.iterdir()} == {
        "node.toml",
        "keystore.json",
        "chain.db",
        "records.db",
        "blobs",
        "tls.crt",
        "tls.key",
    }
    assert (base.root / "keystore.json").stat().st_mode & 0o077 == 0
    assert (base.root / "tls.key").stat().st_mode & 0o077 == 0
    assert "TLS certificate fingerprint: " in base.init.out
    keystore = json.loads((base.root / "keystore.json").read_text())
    assert keystore["format"] == "medledger-keystore"
    assert PASSPHRASE not in (base.root / "keystore.json").read_text()
    toml = (base.root / "node.toml").read_text(encoding="utf-8")
    assert f'institution = "{INSTITUTION}"' in toml
    # The genesis transaction names the key; its fingerprint is what init printed.
    genesis = json.loads(base.txs[0])
    assert genesis["type"] == "chain.genesis"
    assert genesis["chain"] == CHAIN
    der = bytes.fromhex(genesis["body"]["signing_key"])
    fingerprint = hashlib.sha256(der).hexdigest()
    assert f"signing key fingerprint: {fingerprint}" in base.init.out.splitlines()
    assert f"chain:   {CHAIN}" in base.init.out.splitlines()
    assert f'signing_fingerprint = "{fingerprint}"' in toml
    assert base.blocks[0].height == 0
    assert base.blocks[0].first_index == 0


def test_node_init_with_id_and_key_unlocks_with_the_passphrase(tmp_path: Path) -> None:
    root = tmp_path / "new"
    run = ok("node", "init", "--dir", root, "--name", "Clinique Genève", "--id", "geneva-1")
    assert "chain:   private:geneva-1" in run.out
    fingerprint = run.out.strip().rsplit(" ", 1)[-1]
    node = open_node(root, PASSPHRASE.encode())
    try:
        assert node.config.institution == "geneva-1"
        assert node.config.name == "Clinique Genève"
        assert node.keystore.signing_key().fingerprint == fingerprint
    finally:
        asyncio.run(node.close())
    shown = json.loads(ok("node", "show", "--dir", root, "--json").out)
    assert shown["keys"]["signing"]["fingerprint"] == fingerprint
    assert shown["name"] == "Clinique Genève"


def test_open_node_with_a_wrong_passphrase_raises_keystore_error(base: Base) -> None:
    before = snapshot(base.root)
    with pytest.raises(KeyStoreError, match="wrong passphrase"):
        open_node(base.root, b"not the passphrase")
    assert snapshot(base.root) == before


def test_node_show_json_fingerprint_is_sha256_of_spki(base: Base, unchanged: None) -> None:
    info = json.loads(ok("node", "show", "--dir", base.root, "--json", passphrase=None).out)
    assert info["name"] == NAME
    assert info["institution"] == INSTITUTION
    assert info["chain"] == CHAIN
    signing = info["keys"]["signing"]
    assert signing["alg"] == "ecdsa-p256-sha256"
    key = load_public_key(signing["public_key_pem"])
    assert signing["fingerprint"] == spki_fingerprint(key)
    genesis = json.loads(base.txs[0])
    assert signing["fingerprint"] == genesis["body"]["signing_fingerprint"]
    assert base.init.out.rstrip().endswith(signing["fingerprint"])


def test_node_show_text(base: Base, unchanged: None) -> None:
    out = ok("node", "show", "--dir", base.root, passphrase=None).out
    lines = out.splitlines()
    assert lines[0] == f"name:        {NAME}"
    assert f"institution: {INSTITUTION}" in lines
    pem = out[out.index("-----BEGIN PUBLIC KEY-----") :]
    fingerprint = spki_fingerprint(load_public_key(pem))
    assert f"signing key: ecdsa-p256-sha256, fingerprint {fingerprint}" in lines


# -- chain show / chain export ----------------------------------------------------------


def test_chain_show_json_matches_the_head(base: Base, unchanged: None) -> None:
    info = json.loads(ok("chain", "show", "--dir", base.root, "--json", passphrase=None).out)
    head = base.head
    assert set(info) == HEADER_KEYS | {"hash"}
    assert info["height"] == head.height == len(base.blocks) - 1
    assert info["log_size"] == base.log_size
    assert info["hash"] == head.hash.hex() == hashlib.sha256(head.header).hexdigest()
    assert info["log_root"] == ref_root(base.leaves()).hex()
    last = exported(base)[-1]
    assert info["hash"] == last["hash"]
    assert {k: info[k] for k in HEADER_KEYS} == last["header"]


def test_chain_show_text(base: Base, unchanged: None) -> None:
    lines = ok("chain", "show", "--dir", base.root, process=True).out.splitlines()
    assert f"height:   {base.head.height}" in lines
    assert f"hash:     {base.head.hash.hex()}" in lines
    assert f"log_size: {base.log_size}" in lines


def test_chain_export_blocks_hash_link_and_verify(base: Base, unchanged: None) -> None:
    pem = json.loads(ok("node", "show", "--dir", base.root, "--json").out)["keys"]["signing"]
    key = load_public_key(pem["public_key_pem"])
    blocks = exported(base)
    assert len(blocks) == len(base.blocks)
    prev, log_leaves = bytes(32).hex(), []
    for height, (block, row) in enumerate(zip(blocks, base.blocks, strict=True)):
        assert set(block) == {"header", "hash", "signatures", "txs"}
        header = block["header"]
        assert set(header) == HEADER_KEYS
        assert header["height"] == height
        assert header["chain"] == CHAIN
        assert header["proposer"] == INSTITUTION
        assert canonical_bytes(header) == row.header
        block_hash = hashlib.sha256(canonical_bytes(header)).digest()
        assert block["hash"] == block_hash.hex() == row.hash.hex()
        assert header["prev_hash"] == prev
        prev = block["hash"]
        # Signatures: by the node key, ECDSA P-256 over the raw 32-byte block hash.
        assert len(block["signatures"]) == 1
        sig = block["signatures"][0]
        assert sig["signer"] == pem["fingerprint"]
        assert sig["alg"] == "ecdsa-p256-sha256"
        key.verify(bytes.fromhex(sig["sig"]), block_hash, ec.ECDSA(hashes.SHA256()))
        with pytest.raises(InvalidSignature):
            key.verify(bytes.fromhex(sig["sig"]), bytes(32), ec.ECDSA(hashes.SHA256()))
        # Transactions: canonical bytes are the stored bytes; roots re-derived.
        data = [canonical_bytes(tx) for tx in block["txs"]]
        assert data == list(base.txs[row.first_index : row.first_index + row.tx_count])
        assert header["tx_count"] == len(data) >= 1
        assert header["tx_root"] == ref_root([ref_leaf(d) for d in data]).hex()
        log_leaves.extend(ref_leaf(d) for d in data)
        assert header["log_size"] == len(log_leaves)
        assert header["log_root"] == ref_root(log_leaves).hex()
        assert all(tx["chain"] == CHAIN for tx in block["txs"])
    assert len(log_leaves) == base.log_size
    # Non-ASCII survives export unescaped and byte-exact.
    assert NOTE in _exported(base.root)[1]


#: ``chain export --from/--to`` cases; "head" stands for the head's height.
EXPORT_RANGES: list[tuple[int | str | None, int | str | None]] = [
    (0, 0),
    (2, 5),
    (5, None),
    (None, 3),
    ("head", None),
    ("head", "head"),
    (3, 10_000),
    ("head+5", None),
]


def _height(spec: int | str | None, head: int, default: int) -> int:
    if spec is None:
        return default
    if isinstance(spec, int):
        return spec
    return head + int(spec.removeprefix("head") or 0)


@pytest.mark.parametrize(("start", "end"), EXPORT_RANGES)
def test_chain_export_from_to(
    base: Base, unchanged: None, start: int | str | None, end: int | str | None
) -> None:
    head = base.head.height
    first, last = _height(start, head, 0), min(_height(end, head, head), head)
    args: list[str | Path] = ["chain", "export", "--dir", base.root]
    if start is not None:
        args += ["--from", str(first)]
    if end is not None:
        args += ["--to", str(_height(end, head, head))]
    lines = ok(*args).out.splitlines()
    assert lines == list(_exported(base.root)[first : last + 1])
    assert [json.loads(line)["header"]["height"] for line in lines] == list(range(first, last + 1))
    if start == "head+5":
        assert lines == []


# -- proofs -----------------------------------------------------------------------------


def _inclusion_cases() -> list[tuple[int, int | None]]:
    total = 1 + sum(WAVES)
    return [(0, None), (0, 1), (1, 2), (5, 8), (7, 8), (13, 33), (total - 1, None), (20, None)]


@pytest.mark.parametrize(("index", "size"), _inclusion_cases())
def test_proof_inclusion_by_index_verifies(
    base: Base, unchanged: None, index: int, size: int | None
) -> None:
    args: list[str | Path] = ["chain", "proof", "inclusion", "--dir", base.root]
    args += ["--index", str(index)]
    if size is not None:
        args += ["--size", str(size)]
    proof = json.loads(ok(*args).out)
    n = base.log_size if size is None else size
    data = base.txs[index]
    assert proof["index"] == index
    assert proof["size"] == n
    assert proof["tx_hash"] == hashlib.sha256(data).hexdigest()
    assert proof["leaf_hash"] == ref_leaf(data).hex()
    assert proof["root"] == ref_root(base.leaves(n)).hex()
    hashes_ = [bytes.fromhex(h) for h in proof["proof"]]
    verify_inclusion(leaf_hash(data), index, n, hashes_, bytes.fromhex(proof["root"]))
    assert len(hashes_) <= max(1, (n - 1).bit_length())


def test_proof_inclusion_by_tx_hash_matches_index(base: Base, unchanged: None) -> None:
    index = 17
    block = exported(base)[base.block_of(index)]
    first = block["header"]["log_size"] - block["header"]["tx_count"]
    tx_bytes = canonical_bytes(block["txs"][index - first])
    tx_hash = hashlib.sha256(tx_bytes).hexdigest()
    by_tx = json.loads(
        ok("chain", "proof", "inclusion", "--dir", base.root, "--tx", tx_hash, "--size", "40").out
    )
    assert by_tx["index"] == index
    assert by_tx["tx_hash"] == tx_hash
    assert by_tx["size"] == 40
    root = bytes.fromhex(by_tx["root"])
    assert root == ref_root(base.leaves(40))
    verify_inclusion(
        leaf_hash(tx_bytes), index, 40, [bytes.fromhex(h) for h in by_tx["proof"]], root
    )
    by_index = json.loads(
        ok("chain", "proof", "inclusion", "--dir", base.root, "--index", "17", "--size", "40").out
    )
    assert by_index == by_tx


@pytest.mark.parametrize(
    ("old", "new"), [(0, None), (1, None), (3, 8), (8, 8), (7, 33), (16, 32), (21, None)]
)
def test_proof_consistency_verifies(base: Base, unchanged: None, old: int, new: int | None) -> None:
    args: list[str | Path] = ["chain", "proof", "consistency", "--dir", base.root]
    args += ["--old", str(old)]
    if new is not None:
        args += ["--new", str(new)]
    proof = json.loads(ok(*args).out)
    n = base.log_size if new is None else new
    assert proof["old_size"] == old
    assert proof["new_size"] == n
    old_root, new_root = bytes.fromhex(proof["old_root"]), bytes.fromhex(proof["new_root"])
    assert old_root == ref_root(base.leaves(old))
    assert new_root == ref_root(base.leaves(n))
    hashes_ = [bytes.fromhex(h) for h in proof["proof"]]
    verify_consistency(old, n, hashes_, old_root, new_root)
    if old in (0, n):
        assert hashes_ == []
    else:
        assert hashes_
    if new is None:
        assert proof["new_root"] == exported(base)[-1]["header"]["log_root"]


# -- verify -----------------------------------------------------------------------------


def test_verify_ok(base: Base, unchanged: None) -> None:
    run = ok("verify", "--dir", base.root, passphrase=None, process=True)
    line = run.out.strip()
    assert line.startswith(f"OK: {CHAIN}: {len(base.blocks)} blocks, {base.log_size} transactions")
    assert ref_root(base.leaves()).hex() in line
    assert "published root" not in line


def test_verify_with_real_earlier_anchors(base: Base, unchanged: None) -> None:
    block2 = exported(base)[2]["header"]
    # A size inside a block (not at a block boundary): never a header's log_size.
    inner = next(b for b in base.blocks if b.height >= 3 and b.tx_count >= 2)
    mid = inner.first_index + 1
    assert mid not in {json.loads(b.header)["log_size"] for b in base.blocks}
    anchors = [  # deliberately not in size order
        f"{base.log_size}:{ref_root(base.leaves()).hex()}",
        f"{block2['log_size']}:{block2['log_root']}",
        f"{mid}:{ref_root(base.leaves(mid)).hex()}",
    ]
    args: list[str | Path] = ["verify", "--dir", base.root]
    for a in anchors:
        args += ["--anchor", a]
    run = ok(*args)
    assert run.out.startswith("OK: ")
    assert "consistent with 3 published root(s)" in run.out


def test_verify_accepts_the_empty_log_anchor(base: Base, unchanged: None) -> None:
    """Size 0 with the RFC 6962 empty root is a true statement about every log."""
    run = run_cli("verify", "--dir", base.root, "--anchor", f"0:{EMPTY_ROOT.hex()}")
    assert run.code == 0, run
    assert "consistent with 1 published root(s)" in run.out


# -- tampering caught by verify ---------------------------------------------------------


def _tamper_and_verify(node: Base, tamper: Callable[[Path], None], height: int) -> str:
    tamper(node.root / "chain.db")  # the untouched copy verifies: test_verify_ok
    before = snapshot(node.root)
    line = assert_tampered(run_cli("verify", "--dir", node.root), height)
    assert snapshot(node.root) == before, "verify must not write"
    return line


def _flip(data: bytes, pos: int, mask: int) -> bytes:
    out = bytearray(data)
    out[pos] ^= mask
    return bytes(out)


@pytest.mark.parametrize(
    ("index", "how"),
    [(0, "value"), (9, "value"), (9, "structure"), (-1, "value"), (-1, "structure")],
)
def test_verify_detects_a_flipped_tx_byte(node_copy: Base, index: int, how: str) -> None:
    index = index % node_copy.log_size
    data = node_copy.txs[index]
    if how == "value":
        # Keep the JSON canonical: flip a hex digit of a hash/key inside the body.
        key = b'"signing_key":"' if index == 0 else b'"digest":"'
        pos = data.index(key) + len(key) + 3
        mask = 0x01
    else:
        pos, mask = 0, 0x01  # "{" -> "z": no longer JSON
    tampered = _flip(data, pos, mask)
    assert tampered != data

    def tamper(db: Path) -> None:
        sql(db, "UPDATE txs SET data = ? WHERE idx = ?", (tampered, index))

    _tamper_and_verify(node_copy, tamper, node_copy.block_of(index))


@pytest.mark.parametrize("keep", [0, 3, -2])
def test_verify_detects_deleted_last_blocks(node_copy: Base, keep: int) -> None:
    k = keep % node_copy.head.height

    def tamper(db: Path) -> None:
        sql(db, "DELETE FROM blocks WHERE height > ?", (k,))

    line = _tamper_and_verify(node_copy, tamper, k)
    assert "removed" in line
    assert line.endswith("(verify step: head)"), line  # the auditor's step that failed


def test_verify_detects_clean_truncation_only_with_an_anchor(node_copy: Base) -> None:
    """Blocks, txs and nodes past block k removed: only a published root can tell."""
    k = node_copy.head.height - 3
    size = node_copy.blocks[k].first_index + node_copy.blocks[k].tx_count
    head_anchor = f"{node_copy.log_size}:{ref_root(node_copy.leaves()).hex()}"
    db = node_copy.root / "chain.db"
    sql(db, "DELETE FROM blocks WHERE height > ?", (k,))
    sql(db, "DELETE FROM txs WHERE idx >= ?", (size,))
    sql(db, "DELETE FROM nodes WHERE id >= ?", (size << 6,))
    run = ok("verify", "--dir", node_copy.root)
    assert f"{k + 1} blocks, {size} transactions" in run.out
    line = assert_error_line(run_cli("verify", "--dir", node_copy.root, "--anchor", head_anchor), 3)
    assert line.startswith("error: verification FAILED: ")
    assert "truncated" in line


@pytest.mark.parametrize(("a", "b"), [(3, 5), (0, 1), (-2, -1)])
def test_verify_detects_swapped_blocks(node_copy: Base, a: int, b: int) -> None:
    n = len(node_copy.blocks)
    low, high = node_copy.blocks[a % n], node_copy.blocks[b % n]

    def tamper(db: Path) -> None:
        conn = sqlite3.connect(db)
        try:
            with conn:
                for row, other in ((low, high), (high, low)):
                    conn.execute(
                        "UPDATE blocks SET header = ?, hash = ?, signatures = ? WHERE height = ?",
                        (other.header, other.hash, other.signatures, row.height),
                    )
        finally:
            conn.close()

    _tamper_and_verify(node_copy, tamper, low.height)


@pytest.mark.parametrize("rehash", [False, True])
def test_verify_detects_an_edited_header(node_copy: Base, rehash: bool) -> None:
    """A header edit is caught by its hash, or (re-hashed) by the signature over it."""
    row = node_copy.blocks[6]
    header = json.loads(row.header)
    header["time_ms"] += 1
    edited = canonical_bytes(header)
    new_hash = hashlib.sha256(edited).digest() if rehash else row.hash

    def tamper(db: Path) -> None:
        sql(db, "UPDATE blocks SET header = ?, hash = ? WHERE height = ?", (edited, new_hash, 6))

    line = _tamper_and_verify(node_copy, tamper, 6)
    assert ("signature" in line) == rehash


def test_verify_detects_an_edited_merkle_node(node_copy: Base) -> None:
    """A stored proof node is wrong: verify names the block that created it."""
    db = node_copy.root / "chain.db"
    conn = sqlite3.connect(db)
    try:
        ids = [i for (i,) in conn.execute("SELECT id FROM nodes WHERE id & 63 = 2 ORDER BY id")]
    finally:
        conn.close()
    key = ids[len(ids) // 2]
    last_leaf = key >> 6  # sqlite adapter: key = (last leaf << 6) | level

    def tamper(db: Path) -> None:
        sql(db, "UPDATE nodes SET hash = ? WHERE id = ?", (bytes(32), key))

    line = _tamper_and_verify(node_copy, tamper, node_copy.block_of(last_leaf))
    assert "Merkle node" in line


def _edit_sig(sigs_json: str, edit: Callable[[dict[str, Any]], None]) -> str:
    sigs = json.loads(sigs_json)
    edit(sigs[0])
    return json.dumps(sigs, separators=(",", ":"))


def _flip_last_hex(s: dict[str, Any]) -> None:
    s["sig"] = s["sig"][:-1] + ("0" if s["sig"][-1] != "0" else "1")


@pytest.mark.parametrize(
    ("height", "how"),
    [
        (4, "flip"),
        (0, "flip"),
        (-1, "flip"),
        (4, "other-block"),
        (4, "signer"),
        (4, "none"),
        (4, "not-hex"),
    ],
)
def test_verify_detects_an_edited_signature(node_copy: Base, height: int, how: str) -> None:
    h = height % len(node_copy.blocks)
    row = node_copy.blocks[h]
    other = node_copy.blocks[(h + 1) % len(node_copy.blocks)]
    edits: dict[str, Callable[[dict[str, Any]], None]] = {
        "flip": _flip_last_hex,
        "other-block": lambda s: s.update(sig=json.loads(other.signatures)[0]["sig"]),
        "signer": lambda s: s.update(signer=hashlib.sha256(b"someone else").hexdigest()),
        "not-hex": lambda s: s.update(sig="zz" + s["sig"][2:]),
    }
    sigs = "[]" if how == "none" else _edit_sig(row.signatures, edits[how])
    assert sigs != row.signatures

    def tamper(db: Path) -> None:
        sql(db, "UPDATE blocks SET signatures = ? WHERE height = ?", (sigs, h))

    line = _tamper_and_verify(node_copy, tamper, h)
    assert "signature" in line


def test_verify_detects_a_root_from_a_different_history(base: Base, tmp_path: Path) -> None:
    """Two copies of one node grow apart; a root of one is refused by the other."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    shutil.copytree(base.root, ours)
    shutil.copytree(base.root, theirs)
    fill(ours, (3, 4), tag="ours")
    fill(theirs, (3, 4), tag="theirs")
    size = base.log_size + 5
    _, their_txs = read_db(theirs / "chain.db")
    blocks, our_txs = read_db(ours / "chain.db")
    their_root = ref_root([ref_leaf(d) for d in their_txs[:size]])
    our_root = ref_root([ref_leaf(d) for d in our_txs[:size]])
    assert their_root != our_root
    # The shared prefix is still consistent with both.
    shared = f"{base.log_size}:{ref_root(base.leaves()).hex()}"
    assert ok("verify", "--dir", ours, "--anchor", shared).out.startswith("OK: ")
    assert ok("verify", "--dir", ours, "--anchor", f"{size}:{our_root.hex()}").code == 0
    before = snapshot(ours)
    run = run_cli(
        "verify", "--dir", ours, "--anchor", shared, "--anchor", f"{size}:{their_root.hex()}"
    )
    holder = next(
        b.height for b in blocks if b.first_index <= size - 1 < b.first_index + b.tx_count
    )
    line = assert_tampered(run, holder)
    assert their_root.hex() in line
    assert snapshot(ours) == before


# -- bad input: every command, every broken node directory ------------------------------

READ_COMMANDS: dict[str, tuple[str, ...]] = {
    "node show": ("node", "show", "--json"),
    "chain show": ("chain", "show"),
    "chain export": ("chain", "export"),
    "proof inclusion": ("chain", "proof", "inclusion", "--index", "0"),
    "proof consistency": ("chain", "proof", "consistency", "--old", "1"),
    "verify": ("verify",),
}
CHAIN_COMMANDS = [c for c in READ_COMMANDS if c != "node show"]


def _missing(base: Base, root: Path) -> None:
    """Nothing at ``root``."""


def _empty_dir(base: Base, root: Path) -> None:
    root.mkdir()


def _not_a_node(base: Base, root: Path) -> None:
    root.mkdir()
    (root / "notes.txt").write_text("not a node\n")


def _copy(base: Base, root: Path) -> None:
    shutil.copytree(base.root, root)


def _toml_garbage(base: Base, root: Path) -> None:
    _copy(base, root)
    (root / "node.toml").write_bytes(bytes(range(256)) * 4)


def _toml_not_toml(base: Base, root: Path) -> None:
    _copy(base, root)
    (root / "node.toml").write_text("[node\nname = 'x'\n")


def _toml_no_keys(base: Base, root: Path) -> None:
    _copy(base, root)
    text = (root / "node.toml").read_text(encoding="utf-8")
    (root / "node.toml").write_text(text[: text.index("[keys]")], encoding="utf-8")


def _toml_wrong_fingerprint(base: Base, root: Path) -> None:
    _copy(base, root)
    text = (root / "node.toml").read_text(encoding="utf-8")
    fp = json.loads(base.txs[0])["body"]["signing_fingerprint"]
    (root / "node.toml").write_text(text.replace(fp, "ab" * 32), encoding="utf-8")


def _toml_bad_pem(base: Base, root: Path) -> None:
    _copy(base, root)
    text = (root / "node.toml").read_text(encoding="utf-8")
    start = text.index("-----BEGIN PUBLIC KEY-----") + len("-----BEGIN PUBLIC KEY-----\n")
    (root / "node.toml").write_text(text[:start] + "AAAA" + text[start + 4 :], encoding="utf-8")


def _toml_is_a_dir(base: Base, root: Path) -> None:
    _copy(base, root)
    (root / "node.toml").unlink()
    (root / "node.toml").mkdir()


def _db_missing(base: Base, root: Path) -> None:
    _copy(base, root)
    (root / "chain.db").unlink()


def _db_empty_file(base: Base, root: Path) -> None:
    _copy(base, root)
    (root / "chain.db").write_bytes(b"")


def _db_garbage(base: Base, root: Path) -> None:
    _copy(base, root)
    size = (root / "chain.db").stat().st_size
    (root / "chain.db").write_bytes(hashlib.sha256(b"garbage").digest() * (size // 32))


def _db_truncated(base: Base, root: Path) -> None:
    _copy(base, root)
    data = (root / "chain.db").read_bytes()
    (root / "chain.db").write_bytes(data[: len(data) // 2])


BROKEN_NODES: dict[str, Callable[[Base, Path], None]] = {
    "missing dir": _missing,
    "empty dir": _empty_dir,
    "not a node": _not_a_node,
    "node.toml garbage bytes": _toml_garbage,
    "node.toml not toml": _toml_not_toml,
    "node.toml without [keys]": _toml_no_keys,
    "node.toml wrong fingerprint": _toml_wrong_fingerprint,
    "node.toml bad pem": _toml_bad_pem,
    "node.toml is a dir": _toml_is_a_dir,
}
BROKEN_CHAINS: dict[str, Callable[[Base, Path], None]] = {
    "chain.db missing": _db_missing,
    "chain.db empty": _db_empty_file,
    "chain.db garbage": _db_garbage,
    "chain.db truncated to half": _db_truncated,
}


def _check_broken(
    base: Base,
    tmp_path: Path,
    make: Callable[[Base, Path], None],
    commands: Sequence[str],
    expect: str,
) -> None:
    """Run every command on the broken directory; each must fail cleanly."""
    root = tmp_path / "node"
    make(base, root)
    before = snapshot(root)
    existed = root.exists()
    runs = [run_cli(*READ_COMMANDS[c], "--dir", root) for c in commands]
    problems = []
    for cmd, run in zip(commands, runs, strict=True):
        try:
            line = assert_error_line(run)
            assert expect in line, f"{expect!r} not in {line!r}"
        except AssertionError as exc:
            problems.append(f"{cmd}: {exc}")
    assert problems == []
    assert snapshot(root) == before
    assert root.exists() == existed


@pytest.mark.parametrize("broken", list(BROKEN_NODES))
def test_broken_node_dir_gives_one_error_line(base: Base, tmp_path: Path, broken: str) -> None:
    if broken == "missing dir":
        expect = "does not exist"
    elif broken in ("empty dir", "not a node"):
        expect = "not a medledger node"
    else:
        expect = "node.toml"  # errors name where: the file at fault
    _check_broken(base, tmp_path, BROKEN_NODES[broken], list(READ_COMMANDS), expect)


@pytest.mark.parametrize("broken", list(BROKEN_CHAINS))
def test_broken_chain_db_gives_one_error_line(base: Base, tmp_path: Path, broken: str) -> None:
    _check_broken(base, tmp_path, BROKEN_CHAINS[broken], CHAIN_COMMANDS, "chain.db")


def test_node_show_does_not_need_the_chain(base: Base, tmp_path: Path) -> None:
    root = tmp_path / "node"
    _db_garbage(base, root)
    info = json.loads(ok("node", "show", "--dir", root, "--json").out)
    assert info["institution"] == INSTITUTION


def test_bad_sequencer_env_gives_one_error_line(base: Base, unchanged: None) -> None:
    run = run_cli("chain", "show", "--dir", base.root, extra_env={"MEDLEDGER_MAX_TXS": "many"})
    assert "many" in assert_error_line(run)


# -- bad input: node init ---------------------------------------------------------------


def test_node_init_refuses_a_non_empty_dir(base: Base, unchanged: None) -> None:
    line = assert_error_line(run_cli("node", "init", "--dir", base.root, "--name", "Other"))
    assert "not an empty directory" in line


def test_node_init_refuses_a_dir_with_a_stray_file(tmp_path: Path) -> None:
    root = tmp_path / "node"
    root.mkdir()
    (root / "keep.txt").write_text("precious\n")
    before = snapshot(root)
    assert_error_line(run_cli("node", "init", "--dir", root, "--name", NAME))
    assert snapshot(root) == before


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize(
    ("case", "args", "passphrase", "expect"),
    [
        ("empty passphrase", ("--name", NAME), "", "passphrase must not be empty"),
        ("no passphrase, no tty", ("--name", NAME), None, PASSPHRASE_ENV),
        ("one-letter passphrase", ("--name", NAME), "a", "keystore passphrase is too weak"),
        ("a single space", ("--name", NAME), " ", "keystore passphrase is too weak"),
        ("eleven characters", ("--name", NAME), "abcdefghijk", "at least 12 characters"),
        ("blank name", ("--name", "   "), PASSPHRASE, "name"),
        ("name without id chars", ("--name", "!!!"), PASSPHRASE, "--id"),
        ("bad id", ("--name", NAME, "--id", "Bad_ID"), PASSPHRASE, "Bad_ID"),
    ],
)
def test_node_init_bad_input_creates_nothing(
    tmp_path: Path,
    existing: bool,
    case: str,
    args: tuple[str, ...],
    passphrase: str | None,
    expect: str,
) -> None:
    root = tmp_path / "node"
    if existing:
        root.mkdir()
    line = assert_error_line(run_cli("node", "init", "--dir", root, *args, passphrase=passphrase))
    assert expect in line, case
    assert root.exists() == existing
    assert snapshot(root) == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == (["node"] if existing else [])


def test_node_init_under_a_file_gives_one_error_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_error_line(run_cli("node", "init", "--dir", blocker / "node", "--name", NAME))
    assert blocker.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# -- bad input: proofs and verify on a good node ----------------------------------------


def _bad_args(total: int) -> list[tuple[str, tuple[str, ...], str]]:
    unknown = hashlib.sha256(b"no such transaction").hexdigest()
    return [
        ("index == size", ("chain", "proof", "inclusion", "--index", str(total)), "index"),
        ("index > size", ("chain", "proof", "inclusion", "--index", "9", "--size", "5"), "index"),
        (
            "size past head",
            ("chain", "proof", "inclusion", "--index", "0", "--size", str(total + 1)),
            str(total + 1),
        ),
        ("tx not hex", ("chain", "proof", "inclusion", "--tx", "z" * 64), "--tx"),
        ("tx short", ("chain", "proof", "inclusion", "--tx", "abcd"), "--tx"),
        ("tx unknown", ("chain", "proof", "inclusion", "--tx", unknown), unknown),
        ("old > new", ("chain", "proof", "consistency", "--old", "9", "--new", "5"), "9"),
        (
            "old past head",
            ("chain", "proof", "consistency", "--old", str(total + 1)),
            str(total + 1),
        ),
        (
            "new past head",
            ("chain", "proof", "consistency", "--old", "1", "--new", str(total + 1)),
            str(total + 1),
        ),
        ("anchor abc", ("verify", "--anchor", "abc"), "anchor"),
        ("anchor 5:zz", ("verify", "--anchor", "5:zz"), "anchor"),
        ("anchor 5:62 hex", ("verify", "--anchor", "5:" + "ab" * 31), "anchor"),
        ("anchor no size", ("verify", "--anchor", ":" + "ab" * 32), "anchor"),
        ("anchor negative", ("verify", "--anchor", "-1:" + "ab" * 32), "anchor"),
        ("anchor superscript size", ("verify", "--anchor", "\u00b2:" + "ab" * 32), "anchor"),
        (
            "index and tx",
            ("chain", "proof", "inclusion", "--index", "0", "--tx", unknown),
            "--index",
        ),
        ("neither index nor tx", ("chain", "proof", "inclusion"), "--index"),
    ]


_TOTAL = 1 + sum(WAVES)


@pytest.mark.parametrize(
    ("case", "args", "expect"), _bad_args(_TOTAL), ids=[c[0] for c in _bad_args(_TOTAL)]
)
def test_bad_arguments_give_one_error_line(
    base: Base, unchanged: None, case: str, args: tuple[str, ...], expect: str
) -> None:
    assert base.log_size == _TOTAL
    run = run_cli(*args, "--dir", base.root)
    code = 2 if case in ("index and tx", "neither index nor tx") else 1
    line = assert_error_line(run, code)
    assert expect in line, case


def test_anchor_past_the_head_is_reported_as_truncation(base: Base, unchanged: None) -> None:
    anchor = f"{base.log_size + 10}:{'ab' * 32}"
    line = assert_error_line(run_cli("verify", "--dir", base.root, "--anchor", anchor), 3)
    assert line.startswith("error: verification FAILED: ")
    assert str(base.log_size + 10) in line


@pytest.mark.parametrize(
    "args",
    [
        ("node", "show"),
        ("node", "init", "--name", NAME),
        ("chain", "export"),
        ("chain", "proof", "consistency", "--dir", "DIR"),
        ("chain", "proof", "inclusion", "--dir", "DIR", "--index", "-1"),
        ("chain", "proof", "inclusion", "--dir", "DIR", "--index", "one"),
        ("chain", "proof", "inclusion", "--dir", "DIR", "--index", "0", "--size", "0"),
        ("chain", "proof", "consistency", "--dir", "DIR", "--old", "-3"),
        ("chain", "export", "--dir", "DIR", "--from", "-1"),
        ("chain", "export", "--dir", "DIR", "--to", "x"),
        ("chain", "frobnicate", "--dir", "DIR"),
        ("verify", "--dir", "DIR", "--anchor"),
        ("verify", "--dir", "DIR", "--bogus"),
        ("verify",),
    ],
    ids=lambda a: " ".join(a),
)
def test_usage_errors(base: Base, unchanged: None, args: tuple[str, ...]) -> None:
    run = run_cli(*(str(base.root) if a == "DIR" else a for a in args))
    assert_usage_error(run)


def test_dir_that_is_a_file_is_a_usage_error(base: Base) -> None:
    target = base.root / "node.toml"
    before = snapshot(base.root)
    for args in (("node", "show"), ("chain", "show"), ("verify",), ("node", "init", "--name", "x")):
        assert_usage_error(run_cli(*args, "--dir", target))
    assert snapshot(base.root) == before


def test_version_and_help(base: Base) -> None:
    assert "0.1.0" in ok("--version", process=True).out
    help_out = ok("--help", process=True).out
    for command in ("node", "chain", "verify"):
        assert command in help_out


def test_forget_env_wipes_the_value_from_proc_and_from_children() -> None:
    """What ``read_passphrase`` does to an environment variable it read (issue #14, item 15)."""
    script = (
        "import os, subprocess, sys\n"
        "from medledger.cli.common import forget_env\n"
        "forget_env('MEDLEDGER_PASSPHRASE')\n"
        "own = open('/proc/self/environ', 'rb').read()\n"
        "child = subprocess.run(['cat', '/proc/self/environ'], capture_output=True).stdout\n"
        "sys.stdout.write(repr((os.environ.get('MEDLEDGER_PASSPHRASE'), own, child)))\n"
    )
    env = {**os.environ, "MEDLEDGER_PASSPHRASE": "wipe-me passphrase 42"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, timeout=60, check=True
    )
    value, own, child = ast.literal_eval(proc.stdout.decode())
    assert value is None
    assert b"wipe-me" not in own and b"wipe-me" not in child
    assert b"MEDLEDGER_PASSPHRASE" not in child
