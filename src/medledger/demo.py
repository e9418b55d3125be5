"""``medledger demo``: the guided story, narrated for someone seeing medledger first.

Three hospitals on this machine form a consortium (solo ordering). One
writes FHIR records, encrypted, on its private chain; the chain holds no
patient data; search works without a plaintext index; private heads are
anchored on the consortium chain; erasure, key rotation, inclusion proofs;
a Byzantine member's equivocation is recorded; and three attacks on the
stored chain are each caught by ``verify`` — the re-signed rewrite only
with the consortium's anchors.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from medledger.config import NodePaths, load_config
from medledger.core.consortium import ConsortiumParams, quorum
from medledger.core.encoding import canonical_bytes
from medledger.core.errors import Gone, InvalidInput, VerificationError
from medledger.core.merkle import leaf_hash, verify_inclusion
from medledger.core.models import BlockHeader
from medledger.ledger.consortium_verify import anchored_checkpoints
from medledger.ledger.private import PrivateChain
from medledger.ledger.proofs import inclusion_proof
from medledger.ledger.verify import Checkpoint, verify_chain
from medledger.network import LocalNetwork
from medledger.node import load_genesis, open_chain, open_consortium_chain
from medledger.services.records import ingest
from medledger.services.synthetic import generate_patients
from medledger.storage.keystore import FileKeyStore, KdfParams
from medledger.storage.sqlite import SqliteChainStore

__all__ = ["run_demo"]

_PASS = b"demo-passphrase"


def run_demo(root: Path | None) -> None:
    """Run the story in ``root`` (kept) or a temporary directory (removed)."""
    console = Console()
    tmp = None
    if root is None:
        tmp = tempfile.mkdtemp(prefix="medledger-demo-")
        root = Path(tmp) / "network"
    elif root.exists() and any(root.iterdir()):
        raise InvalidInput(f"{root} is not empty; give a new directory for the demo network")
    try:
        asyncio.run(_story(console, root))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _verify_line(root: Path, *, consortium: bool = False) -> tuple[bool, str]:
    checkpoints: list[Checkpoint] = []
    if consortium:
        _, cstore = open_consortium_chain(root)
        try:
            checkpoints = anchored_checkpoints(cstore, load_config(root).institution)
        finally:
            cstore.close()
    config, store = open_chain(root)
    try:
        r = verify_chain(store, expected_key=config.signing_key, checkpoints=checkpoints)
        return True, f"OK: {r.blocks} blocks, {r.log_size} transactions, every check passed"
    except VerificationError as exc:
        return False, f"verification FAILED: {exc}"
    finally:
        store.close()


def _found_on_disk(root: Path, needle: str) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and needle.encode() in path.read_bytes():
            hits.append(path.name)
    return hits


async def _story(console: Console, root: Path) -> None:
    say = console.print
    say(
        Panel.fit(
            "[bold]medledger[/] keeps health records for collaborating institutions on a hybrid "
            "blockchain.\nEach institution writes to its own fast, private chain; a consortium chain "
            "shared by all anchors those chains; records are FHIR R4, encrypted off-chain; chains "
            "hold only hashes and pseudonyms.\nThis demo runs three hospitals on this machine.",
            title="medledger demo",
        )
    )

    say("\n[bold]1. Three hospitals set up nodes and form a consortium[/]")
    net = await LocalNetwork.create(
        root,
        ["St. Mary Hospital", "General Hospital", "Riverside Clinic"],
        passphrase=_PASS,
        consortium="city-health",
        kdf=KdfParams(n=2**14),
        params=ConsortiumParams(cut_after_ms=10, anchor_interval_ms=100),
    )
    try:
        await _narrate(say, net, root)
    finally:
        await net.close()
    await _attacks(say, root / "st-mary-hospital")
    say("\n[bold]What to try next[/]")
    say("   make test                                  # the whole test suite")
    say("   medledger bench private --quick            # group commit, proofs, verify")
    say("   medledger bench records --quick            # encrypted FHIR writes, reads, search")
    say("   medledger demo --dir ./demo-net            # keep the network, then explore a node:")
    say("   medledger consortium status --dir ./demo-net/st-mary-hospital")
    say("   medledger verify --consortium --dir ./demo-net/st-mary-hospital")
    say(
        "   MEDLEDGER_PASSPHRASE=demo-passphrase medledger record search "
        "--dir ./demo-net/st-mary-hospital Patient gender=female"
    )


async def _narrate(say: Any, net: LocalNetwork, root: Path) -> None:
    node = net.nodes["st-mary-hospital"]
    genesis = load_genesis(node.paths.genesis)
    say(
        f"   Each node has a passphrase-protected keystore (scrypt + AES-256-GCM) with its ECDSA "
        f"P-256 signing key, key-encryption key and search key, and its own private chain. The "
        f"genesis document lists the {len(genesis.members)} members; a consortium block is final "
        f"with {quorum(len(genesis.members))} member signatures."
    )

    say("\n[bold]2. St. Mary's clinical systems write 40 synthetic patients' records at once[/]")
    bundles = generate_patients(40, seed=2026, resources_per_patient=25)
    start = time.perf_counter()
    await ingest(node.records, [r for b in bundles for r in (b.patient, *b.resources)], 32)
    elapsed = time.perf_counter() - start
    n = sum(1 + len(b.resources) for b in bundles)
    say(
        f"   {n:,} FHIR resources validated, each encrypted under its own AES-256-GCM key, and "
        f"committed on St. Mary's private chain in {elapsed:.1f} s ({n / elapsed:,.0f}/s, "
        f"{node.chain.head.height} blocks). The sequencer [italic]group-commits[/]: whatever is "
        "queued becomes one signed block and one fsync, and a writer is answered only once its "
        "block is on disk — that is the hybrid design's fast path: no consortium round trip."
    )
    alice = bundles[0]
    family = alice.patient["name"][0]["family"]
    obs = next(r for r in alice.resources if r["resourceType"] == "Observation")
    stored = await node.records.read("Observation", obs["id"])
    _, tx_data = node.store.tx_by_hash(stored.tx_hash)
    coding = obs["code"]["coding"][0]
    say(
        f"   Reading Observation/{obs['id'][:8]}… of patient {family} decrypts it: "
        f"{coding.get('display', coding['code'])}. What the chain holds for it — no name, no code, "
        "no value:"
    )
    say(f"   [dim]{json.loads(tx_data)['body']}[/]")
    hits = _found_on_disk(root, family)
    say(
        f"   Searching every file of all three nodes for the name {family!r}: "
        f"{'found in ' + ', '.join(hits) if hits else 'not found anywhere'}."
    )
    found = await node.records.search("Observation", {"patient": [alice.patient_id]})
    by_name = await node.records.search("Patient", {"family": [family[:3]]})
    say(
        f"   Search still works without a plaintext index: Observation?patient=… → {len(found)}, "
        f"Patient?family={family[:3]} → {len(by_name)} (HMAC tokens under the search key)."
    )

    say("\n[bold]3. Anchoring: every private chain becomes globally tamper-evident[/]")
    start = time.perf_counter()
    await net.wait_anchored()
    waited = time.perf_counter() - start
    anchor = node.consortium.state.anchors["st-mary-hospital"] if node.consortium else None
    say(
        f"   Within {waited * 1000:.0f} ms St. Mary's head (log size "
        f"{anchor.log_size if anchor else '?'}) was anchored on the consortium chain: the anchor "
        "carries an RFC 6962 consistency proof from the previous anchor, every member checked it, "
        "and a quorum signed the block. From now on not even St. Mary can rewrite that history."
    )

    say("\n[bold]4. Erasure (right to be forgotten) and key rotation[/]")
    erased = await node.records.erase_patient(bundles[1].patient_id)
    try:
        await node.records.read("Patient", bundles[1].patient_id)
        gone = "still readable (unexpected)"
    except Gone:
        gone = "410 Gone"
    rotation = await node.records.rotate_kek()
    again = await node.records.read("Observation", obs["id"])
    say(
        f"   Erasing patient #2 crypto-shreds {erased} resources (data keys and ciphertexts "
        f"destroyed, tombstones appended); reading them now gives {gone}, and the chain still "
        "verifies."
    )
    say(
        f"   Rotating the key-encryption key re-wrapped {rotation['rewrapped']:,} data keys "
        f"without re-encrypting any record; reads still work (Observation v{again.version})."
    )
    await net.wait_anchored()

    say("\n[bold]5. Proofs an outsider can check (RFC 6962, as Certificate Transparency uses)[/]")
    store = node.store
    size = node.chain.head.log_size
    root_hash = node.chain.head.log_root
    index, data = store.tx_by_hash(stored.tx_hash)
    proof = inclusion_proof(store, index, size)
    verify_inclusion(leaf_hash(data), index, size, proof, root_hash)
    say(
        f"   The Observation's record.put is entry {index} of {size}: proven with {len(proof)} "
        f"hashes against the anchored root {root_hash.hex()[:16]}… — verified."
    )
    # A Byzantine member signs a conflicting block: the others record the evidence.
    evil = net.nodes["riverside-clinic"]
    cstore = node.consortium_store
    height = node.consortium.final_height if node.consortium else 1
    assert cstore is not None
    real = BlockHeader.decode(cstore.block(height).header_bytes)
    fake = replace(real, time_ms=real.time_ms + 1)
    vote = canonical_bytes(
        {
            "kind": "vote",
            "header": fake.to_json(),
            "signature": evil.keystore.signing_key().sign(fake.hash()).to_json(),
        }
    )
    await net.orderers[0].publish("equivocation-demo", vote)
    await asyncio.sleep(0.1)
    evidence = node.consortium.evidence if node.consortium else ()
    say(
        f"   Riverside signs a second, conflicting block at height {height}: "
        f"{'every member records equivocation evidence against ' + evidence[0].member if evidence else 'not detected (unexpected)'}"
        "; it is no longer counted toward finality."
    )


async def _attacks(say: Any, root: Path) -> None:
    say("\n[bold]6. Attacks on St. Mary's stored chain[/] (each on a copy of the node)")
    table = Table(show_lines=True)
    table.add_column("attack")
    table.add_column("medledger verify says")
    a = _attack_copy(root, "flip")
    _sql(
        a,
        "UPDATE txs SET data = CAST(replace(CAST(data AS TEXT), '\"version\":1', "
        "'\"version\":2') AS BLOB) WHERE idx = 100",
    )
    table.add_row("An administrator edits one stored transaction", _verdict(_verify_line(a)))
    b = _attack_copy(root, "truncate")
    _sql(b, "DELETE FROM blocks WHERE height > (SELECT MAX(height) - 3 FROM blocks)")
    table.add_row("Someone deletes the last three blocks", _verdict(_verify_line(b)))
    c = _attack_copy(root, "rewrite")
    await _rewrite_history(c)
    table.add_row(
        "An insider rewrites history and re-signs every block with the institution's own key",
        _verdict(_verify_line(c)),
    )
    table.add_row(
        "… the same, checked against the consortium's final anchors (verify --consortium)",
        _verdict(_verify_line(c, consortium=True)),
    )
    say(table)
    for p in (a, b, c):
        shutil.rmtree(p, ignore_errors=True)
    say(
        "   A re-signed history is internally perfect; the roots anchored on the consortium "
        "chain, final under a quorum of members' signatures, expose it."
    )


class _FixedClock:
    def __init__(self, ms: int) -> None:
        self._ms = ms

    def now_ms(self) -> int:
        return self._ms


def _verdict(result: tuple[bool, str]) -> str:
    ok, line = result
    return f"[green]{line}[/]" if ok else f"[red]{line}[/]"


def _attack_copy(root: Path, name: str) -> Path:
    target = root.parent / f"{root.name}-{name}"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(root, target)
    return target


def _sql(root: Path, statement: str) -> None:
    conn = sqlite3.connect(NodePaths(root=root).chain_db, isolation_level=None)
    try:
        conn.execute(statement)
    finally:
        conn.close()


async def _rewrite_history(root: Path) -> None:
    """What an insider with the keystore could do: rebuild the chain, one record changed."""
    paths = NodePaths(root=root)
    key = FileKeyStore.open(paths.keystore, _PASS).signing_key()
    _, old = open_chain(root)
    try:
        first = json.loads(old.block(0).tx_data[0])
        genesis, genesis_time = first["body"], first["time_ms"]
        txs = [json.loads(old.tx_data(i)) for i in range(1, old.counts()[1])]
    finally:
        old.close()
    txs[50]["body"]["version"] = 7  # the record an insider wanted to change
    fresh = paths.chain_db.with_suffix(".new")
    store = SqliteChainStore.create(fresh, f"private:{genesis['institution']}")
    # Same genesis transaction and time as the original: a careful forger.
    chain = PrivateChain.create(
        store,
        key,
        chain_id=store.chain,
        institution=genesis["institution"],
        name=genesis["name"],
        clock=_FixedClock(genesis_time),
    )  # Tasks start in creation order, so the log order is kept while blocks batch.
    await asyncio.gather(*(chain.submit(tx["type"], tx["body"]) for tx in txs))
    await chain.close()
    store.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(paths.chain_db) + suffix).unlink(missing_ok=True)
    fresh.rename(paths.chain_db)
