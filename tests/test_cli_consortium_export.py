"""``consortium export`` and ``verify --consortium-export``: the consortium checked without a node.

A real three-member network (in-process nodes on a solo order, records written
and anchored) is built once; then, through the command as an auditor would
run it (the first ``verify --consortium-export`` as the console script in a
subprocess, the others through the CLI's entry point in this process): the export verifies from the file alone and gives the same answer
as ``verify --consortium`` on the node — on the clean network and on a node
whose consortium store was tampered with — and an edited, shortened or
reordered export fails with exit 3. ``/chain/consortium/export`` serves the same
lines to an auditor token.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest

from medledger.api.app import create_app
from medledger.cli.consortium import verify_consortium_export
from medledger.core.consortium import ConsortiumParams, Genesis
from medledger.core.encoding import canonical_bytes
from medledger.core.errors import VerificationError
from medledger.core.keys import SigningKey
from medledger.core.models import BlockHeader
from medledger.ledger.consortium.evidence import Evidence
from medledger.localnet.network import LocalNetwork
from medledger.storage.keystore import FileKeyStore, KdfParams
from medledger.storage.sqlite.tokens import SqliteTokenStore
from medledger.synthetic import generate_patients
from network_support import run_cli

PASSPHRASE = b"consortium export test passphrase"
NAMES = ["Alpha Clinic", "Beta Hospital", "Gamma Lab"]


@dataclass(frozen=True)
class Built:
    base: Path
    #: What /chain/consortium/export answered (alpha's copy) while the network ran.
    api_export: bytes
    api_unauthenticated: int
    api_page: bytes
    #: ``consortium export`` of alpha's copy, run after the network stopped.
    export: Path

    @property
    def alpha(self) -> Path:
        return self.base / "alpha-clinic"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    base = tmp_path_factory.mktemp("cexport") / "net"

    async def main() -> tuple[bytes, int, bytes]:
        net = await LocalNetwork.create(
            base,
            NAMES,
            passphrase=PASSPHRASE,
            consortium="export-test",
            params=ConsortiumParams(cut_after_ms=5, anchor_interval_ms=50),
            kdf=KdfParams(n=2**12),
        )
        tokens = SqliteTokenStore(base / "tokens.db")
        try:
            for seed, node in enumerate(net.nodes.values()):
                for patient in generate_patients(2, seed=seed, resources_per_patient=1):
                    for resource in patient.all_resources():
                        await node.records.update(
                            resource["resourceType"], resource["id"], resource
                        )
                await net.wait_anchored()
            alpha = net.nodes["alpha-clinic"]
            token = tokens.create(role="auditor", now_ms=1, label="auditor")[0]
            transport = httpx.ASGITransport(app=create_app(alpha, tokens))
            async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
                auth = {"Authorization": f"Bearer {token}"}
                whole = await client.get("/chain/consortium/export", headers=auth)
                assert whole.status_code == 200, whole.text
                assert whole.headers["content-type"] == "application/x-ndjson"
                page = await client.get("/chain/consortium/export?from=1&to=2", headers=auth)
                assert page.status_code == 200, page.text
                anonymous = await client.get("/chain/consortium/export")
            return whole.content, anonymous.status_code, page.content
        finally:
            tokens.close()
            await net.close()

    api_export, anonymous, page = asyncio.run(main())
    export = _export(base / "alpha-clinic", base.parent / "consortium.jsonl")
    return Built(
        base=base,
        api_export=api_export,
        api_unauthenticated=anonymous,
        api_page=page,
        export=export,
    )


def _export(root: Path, out: Path, *args: str) -> Path:
    run = run_cli("consortium", "export", "--dir", root, *args, in_process=True)
    assert run.code == 0, run
    out.write_text(run.out)
    return out


def _copy(built: Built, tmp_path: Path) -> Path:
    root = tmp_path / "alpha"
    shutil.copytree(built.base / "alpha-clinic", root)
    return root


def test_the_export_verifies_alone_and_answers_as_the_node_does(
    built: Built, tmp_path: Path
) -> None:
    root, export = built.alpha, built.export
    lines = export.read_bytes().splitlines()
    assert len(lines) >= 4
    assert [json.loads(line)["header"]["height"] for line in lines] == list(range(len(lines)))
    on_node = run_cli("verify", "--dir", root, "--consortium", in_process=True)
    alone = run_cli("verify", "--consortium-export", export)
    assert on_node.code == 0 and alone.code == 0, (on_node, alone)
    consortium_line = on_node.out.splitlines()[0]
    assert consortium_line.startswith("OK: consortium:export-test: ")
    assert alone.out.splitlines()[0] == consortium_line
    genesis = json.loads((root / "genesis.json").read_text())
    assert json.loads(lines[0])["txs"][0]["body"] == genesis
    assert f"genesis hash {Genesis.from_json(genesis).hash().hex()}" in alone.out
    # With the auditor's own genesis, and with the node: the private chain checked
    # against the export's anchors, exactly as against the node's own copy.
    report, _, _ = verify_consortium_export(export, root / "genesis.json")
    assert report.blocks == len(lines)
    both = run_cli("verify", "--dir", root, "--consortium-export", export, in_process=True)
    assert both.code == 0, both
    assert both.out.splitlines()[-1] == on_node.out.splitlines()[-1]
    assert "consistent with" in on_node.out.splitlines()[-1]


def test_the_api_serves_the_same_lines_to_an_auditor(built: Built) -> None:
    export = built.export
    # The CLI export is read later: the chain may have grown by then (anchors stop).
    assert export.read_bytes().startswith(built.api_export)
    assert built.api_unauthenticated == 401
    page = built.api_page.splitlines()
    assert [json.loads(line)["header"]["height"] for line in page] == [1, 2]
    assert page == export.read_bytes().splitlines()[1:3]


def test_from_to_exports_a_range(built: Built, tmp_path: Path) -> None:
    export = _export(built.alpha, tmp_path / "c.jsonl", "--from", "1", "--to", "2")
    assert export.read_bytes().splitlines() == built.export.read_bytes().splitlines()[1:3]
    # A range without block 0 is no chain to verify on its own.
    with pytest.raises(VerificationError, match="block 0"):
        verify_consortium_export(export)


def _flip_hex(text: str) -> str:
    return text[:-1] + ("0" if text[-1] != "0" else "1")


def _tamper_store(root: Path) -> None:
    """Edit block 2's certificate in the node's consortium store, as an insider could."""
    conn = sqlite3.connect(root / "consortium.db", isolation_level=None)
    try:
        (sigs,) = conn.execute("SELECT signatures FROM blocks WHERE height = 2").fetchone()
        edited = json.loads(sigs)
        edited[0]["sig"] = _flip_hex(edited[0]["sig"])
        edited = edited[:2]  # the quorum of three members is two
        conn.execute(
            "UPDATE blocks SET signatures = ? WHERE height = 2",
            (json.dumps(edited, separators=(",", ":")),),
        )
    finally:
        conn.close()


def test_a_tampered_store_fails_on_the_node_and_in_its_export_alike(
    built: Built, tmp_path: Path
) -> None:
    root = _copy(built, tmp_path)
    _tamper_store(root)
    on_node = run_cli("verify", "--dir", root, "--consortium", in_process=True)
    export = _export(root, tmp_path / "tampered.jsonl")
    alone = run_cli("verify", "--consortium-export", export, in_process=True)
    assert on_node.code == 3 and alone.code == 3, (on_node, alone)
    assert "finality certificate" in on_node.err
    assert alone.err == on_node.err


def _edit_line(lines: list[bytes], index: int) -> list[bytes]:
    block = json.loads(lines[index])
    block["txs"][0]["time_ms"] += 1
    return [*lines[:index], json.dumps(block).encode(), *lines[index + 1 :]]


EXPORT_EDITS = {
    "edited-transaction": lambda lines: _edit_line(lines, 2),
    "dropped-block": lambda lines: [*lines[:2], *lines[3:]],
    "swapped-blocks": lambda lines: [lines[0], lines[2], lines[1], *lines[3:]],
    "duplicated-block": lambda lines: [*lines[:3], lines[2], *lines[3:]],
    "stripped-certificate": lambda lines: [
        *lines[:1],
        json.dumps({**json.loads(lines[1]), "signatures": []}).encode(),
        *lines[2:],
    ],
    "not-json": lambda lines: [*lines[:1], b"{not json", *lines[1:]],
    "float-in-header": lambda lines: [
        *lines[:1],
        lines[1].replace(b'"height":1', b'"height":1.0'),
        *lines[2:],
    ],
}


def _edited(built: Built, tmp_path: Path, edit: str) -> Path:
    lines = built.export.read_bytes().splitlines()
    edited = tmp_path / "edited.jsonl"
    edited.write_bytes(b"\n".join(EXPORT_EDITS[edit](lines)) + b"\n")
    return edited


@pytest.mark.parametrize("edit", sorted(EXPORT_EDITS))
def test_an_edited_export_fails(built: Built, tmp_path: Path, edit: str) -> None:
    with pytest.raises(VerificationError):
        verify_consortium_export(_edited(built, tmp_path, edit))


def test_an_edited_export_fails_on_the_command_line(built: Built, tmp_path: Path) -> None:
    run = run_cli(
        "verify", "--consortium-export", _edited(built, tmp_path, "swapped-blocks"), in_process=True
    )
    assert run.code == 3, run
    assert run.err.startswith("error: verification FAILED: ") and run.err.count("\n") == 1


def test_usage_errors(built: Built) -> None:
    assert run_cli("verify", in_process=True).code == 2
    backwards = run_cli(
        "consortium", "export", "--dir", built.alpha, "--from", "3", "--to", "1", in_process=True
    )
    assert backwards.code == 2


def _signed_pair(root: Path, key: SigningKey, member: str, height: int) -> bytes:
    """An evidence record: ``key`` signed block ``height`` of alpha's copy and a forged twin."""
    from medledger.node import open_consortium_chain

    _, store = open_consortium_chain(root)
    try:
        real = BlockHeader.decode(store.block(height).header_bytes)
    finally:
        store.close()
    twin = replace(real, time_ms=real.time_ms + 1)
    evidence = Evidence(
        member=member,
        height=height,
        first_header=real,
        first=key.sign(real.hash()),
        second_header=twin,
        second=key.sign(twin.hash()),
    )
    return canonical_bytes(evidence.to_json()) + b"\n"


def test_evidence_is_checked_before_status_shows_it(built: Built, tmp_path: Path) -> None:
    root = _copy(built, tmp_path)
    beta = FileKeyStore.open(built.base / "beta-hospital" / "keystore.json", PASSPHRASE)
    (root / "evidence.jsonl").write_bytes(
        _signed_pair(root, beta.signing_key(), "beta-hospital", 2)
    )
    status = run_cli("consortium", "status", "--dir", root, "--json", in_process=True)
    assert status.code == 0, status
    (shown,) = json.loads(status.out)["evidence"]
    assert (shown["member"], shown["height"]) == ("beta-hospital", 2)
    # A record signed by anyone but the member it names accuses no one.
    (root / "evidence.jsonl").write_bytes(
        _signed_pair(root, SigningKey.generate(), "beta-hospital", 2)
    )
    status = run_cli("consortium", "status", "--dir", root, in_process=True)
    verify = run_cli("verify", "--dir", root, "--consortium", in_process=True)
    for run in (status, verify):
        assert run.code == 3, run
        assert "EQUIVOCATION" not in run.out
        assert "evidence.jsonl line 1 is not valid equivocation evidence" in run.err
