"""``/chain``: anyone with an auditor token can verify the node from outside.

Heads and blocks are checked against ``medledger chain export`` and against
hashes re-derived with hashlib; every proof is checked with the RFC 6962
verifiers of ``medledger.core.merkle`` and the roots against block headers.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from typing import Any

import httpx
import pytest
from api_helpers import (
    LiveServer,
    assert_outcome,
    canonical_sha256,
    cli_command,
    independent_leaf_hash,
    seed_patients,
)

from medledger.core.encoding import canonical_bytes
from medledger.core.merkle import verify_consistency, verify_inclusion

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


@pytest.fixture(scope="module")
def blocks(live: LiveServer) -> list[dict[str, Any]]:
    """Write several blocks' worth of records, then return every block via the API."""
    seed_patients(live, 3, per_patient=10)
    with live.client(live.auditor) as auditor:
        head = auditor.get("/chain/private/head").json()
        out = []
        for h in range(head["height"] + 1):
            r = auditor.get(f"/chain/private/blocks/{h}")
            assert r.status_code == 200, r.text
            out.append(r.json())
    assert len(out) >= 4
    return out


def bytes_hex(text: str) -> bytes:
    return bytes.fromhex(text)


def test_head_is_the_last_block_header(auditor: httpx.Client, blocks: list[dict[str, Any]]) -> None:
    r = auditor.get("/chain/private/head")
    assert r.status_code == 200
    head = r.json()
    assert set(head) == HEADER_KEYS | {"hash"}
    last = blocks[-1]
    assert {k: head[k] for k in HEADER_KEYS} == last["header"]
    assert head["hash"] == last["hash"]
    # The block hash is SHA-256 of the canonical header, recomputed independently.
    assert canonical_sha256(last["header"]).hex() == head["hash"]
    assert head["log_size"] == sum(b["header"]["tx_count"] for b in blocks)


def test_blocks_are_the_same_json_as_chain_export(
    live: LiveServer, blocks: list[dict[str, Any]]
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDLEDGER_")}
    out = subprocess.run(
        [*cli_command(), "chain", "export", "--dir", str(live.root), "--to", str(len(blocks) - 1)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    exported = [json.loads(line) for line in out.stdout.splitlines()]
    assert exported == blocks


def test_blocks_link_and_hash(blocks: list[dict[str, Any]]) -> None:
    prev = "00" * 32
    for height, block in enumerate(blocks):
        header = block["header"]
        assert header["height"] == height
        assert header["prev_hash"] == prev
        assert header["tx_count"] == len(block["txs"])
        assert canonical_sha256(header).hex() == block["hash"]
        assert block["signatures"], f"block {height} is unsigned"
        prev = block["hash"]


def _leaves(blocks: list[dict[str, Any]]) -> list[bytes]:
    return [canonical_bytes(tx) for b in blocks for tx in b["txs"]]


def test_inclusion_proofs_by_index_verify(
    auditor: httpx.Client, blocks: list[dict[str, Any]]
) -> None:
    leaves = _leaves(blocks)
    head = blocks[-1]["header"]
    for index in sorted({0, 1, len(leaves) // 2, len(leaves) - 2, len(leaves) - 1}):
        r = auditor.get("/chain/private/proof/inclusion", params={"index": index})
        assert r.status_code == 200, r.text
        proof = r.json()
        assert proof["index"] == index
        assert proof["size"] == head["log_size"]
        assert proof["root"] == head["log_root"]
        assert proof["tx_hash"] == hashlib.sha256(leaves[index]).hexdigest()
        assert proof["leaf_hash"] == independent_leaf_hash(leaves[index]).hex()
        verify_inclusion(
            bytes_hex(proof["leaf_hash"]),
            index,
            proof["size"],
            [bytes_hex(h) for h in proof["proof"]],
            bytes_hex(proof["root"]),
        )


def test_inclusion_proof_by_tx_hash_and_against_an_older_size(
    auditor: httpx.Client, blocks: list[dict[str, Any]]
) -> None:
    leaves = _leaves(blocks)
    index = len(leaves) // 3
    tx_hash = hashlib.sha256(leaves[index]).hexdigest()
    r = auditor.get("/chain/private/proof/inclusion", params={"tx": tx_hash})
    assert r.status_code == 200, r.text
    proof = r.json()
    assert proof["index"] == index
    verify_inclusion(
        independent_leaf_hash(leaves[index]),
        index,
        proof["size"],
        [bytes_hex(h) for h in proof["proof"]],
        bytes_hex(proof["root"]),
    )
    # Against the root published in an earlier block header.
    earlier = next(b["header"] for b in blocks if b["header"]["log_size"] > index)
    r = auditor.get(
        "/chain/private/proof/inclusion", params={"tx": tx_hash, "size": earlier["log_size"]}
    )
    old = r.json()
    assert old["root"] == earlier["log_root"]
    verify_inclusion(
        independent_leaf_hash(leaves[index]),
        index,
        earlier["log_size"],
        [bytes_hex(h) for h in old["proof"]],
        bytes_hex(earlier["log_root"]),
    )


def test_consistency_proofs_verify(auditor: httpx.Client, blocks: list[dict[str, Any]]) -> None:
    head = blocks[-1]["header"]
    for block in blocks[:-1]:
        old = block["header"]
        r = auditor.get("/chain/private/proof/consistency", params={"old": old["log_size"]})
        assert r.status_code == 200, r.text
        proof = r.json()
        assert proof["old_root"] == old["log_root"]
        assert proof["new_root"] == head["log_root"]
        assert proof["new_size"] == head["log_size"]
        verify_consistency(
            old["log_size"],
            head["log_size"],
            [bytes_hex(h) for h in proof["proof"]],
            bytes_hex(old["log_root"]),
            bytes_hex(head["log_root"]),
        )
    mid = blocks[len(blocks) // 2]["header"]
    r = auditor.get(
        "/chain/private/proof/consistency",
        params={"old": blocks[1]["header"]["log_size"], "new": mid["log_size"]},
    )
    proof = r.json()
    assert proof["new_root"] == mid["log_root"]
    verify_consistency(
        blocks[1]["header"]["log_size"],
        mid["log_size"],
        [bytes_hex(h) for h in proof["proof"]],
        bytes_hex(blocks[1]["header"]["log_root"]),
        bytes_hex(mid["log_root"]),
    )


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/chain/private/blocks/100000", 404),
        ("/chain/private/blocks/-1", (400, 404)),
        ("/chain/private/blocks/abc", 400),
        ("/chain/private/proof/inclusion", 400),
        ("/chain/private/proof/inclusion?index=0&tx=" + "00" * 32, 400),
        ("/chain/private/proof/inclusion?tx=zz", 400),
        ("/chain/private/proof/inclusion?tx=" + "ab" * 32, 404),
        ("/chain/private/proof/inclusion?index=100000", 400),
        ("/chain/private/proof/inclusion?index=-1", 400),
        ("/chain/private/proof/consistency", 400),
        ("/chain/private/proof/consistency?old=5&new=2", 400),
        ("/chain/private/proof/consistency?old=-1", 400),
        ("/chain/sideways/head", 404),
        ("/chain/sideways/blocks/0", 404),
    ],
)
def test_bad_chain_requests_are_operation_outcomes(
    auditor: httpx.Client, blocks: list[dict[str, Any]], path: str, status: int | tuple[int, ...]
) -> None:
    assert_outcome(auditor.get(path), status)


@pytest.mark.parametrize(
    "path",
    [
        "/chain/consortium/head",
        "/chain/consortium/blocks/0",
        "/chain/consortium/proof/inclusion?index=0",
        "/chain/consortium/proof/consistency?old=0",
        "/chain/consortium/status",
        "/chain/consortium/export",
    ],
)
def test_consortium_endpoints_are_404_without_a_consortium(
    auditor: httpx.Client, path: str
) -> None:
    body = assert_outcome(auditor.get(path), 404, code="not-found")
    assert "consortium" in json.dumps(body)


def test_export_is_the_blocks_as_json_lines(
    live: LiveServer, auditor: httpx.Client, blocks: list[dict[str, Any]]
) -> None:
    whole = auditor.get("/chain/private/export")
    assert whole.status_code == 200, whole.text
    assert whole.headers["content-type"] == "application/x-ndjson"
    assert "medledger-next-from" not in whole.headers  # a small chain is one page
    exported = [json.loads(line) for line in whole.content.splitlines()]
    assert exported[: len(blocks)] == blocks
    # Each line is the block's canonical JSON.
    assert whole.content.splitlines()[0] == canonical_bytes(blocks[0])
    part = auditor.get("/chain/private/export", params={"from": 1, "to": 2})
    assert [json.loads(line) for line in part.content.splitlines()] == blocks[1:3]
    assert_outcome(auditor.get("/chain/private/export", params={"from": 3, "to": 1}), 400)
    with live.client() as anonymous:
        assert anonymous.get("/chain/private/export").status_code == 401


def test_export_pages_name_the_next_height(
    auditor: httpx.Client, blocks: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page ends after its byte budget (at least one block) and says where to go on."""
    from medledger.api import chain as chain_api

    monkeypatch.setattr(chain_api, "MAX_EXPORT_PAGE_BYTES", 1)
    collected, start = [], 0
    while True:
        page = auditor.get("/chain/private/export", params={"from": start})
        assert page.status_code == 200, page.text
        lines = page.content.splitlines()
        assert len(lines) == 1
        collected.append(json.loads(lines[0]))
        if "medledger-next-from" not in page.headers:
            break
        start = int(page.headers["medledger-next-from"])
        assert start == collected[-1]["header"]["height"] + 1
    assert collected[: len(blocks)] == blocks


def test_chain_still_verifies(live: LiveServer, blocks: list[dict[str, Any]]) -> None:
    report = live.verify()
    assert report.log_size == blocks[-1]["header"]["log_size"]
