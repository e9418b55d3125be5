"""``medledger demo``: the guided story, narrated for someone seeing medledger first.

One institution's node: FHIR records written encrypted by concurrent
clinical systems and committed on its private chain; what the chain holds
(no patient data); search without a plaintext index; proofs an outsider can
check; erasure and key rotation; and three attacks on the stored chain, each
caught by ``verify``. Later capabilities (consortium, consent, sharing)
extend it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from medledger.config import NodePaths
from medledger.core.errors import Gone, VerificationError
from medledger.core.merkle import leaf_hash, verify_consistency, verify_inclusion
from medledger.ledger.private import PrivateChain
from medledger.ledger.proofs import consistency_proof, inclusion_proof, root_at
from medledger.ledger.verify import Checkpoint, verify_chain
from medledger.node import Node, init_node, open_chain, open_node
from medledger.services.synthetic import PatientBundle, generate_patients
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
        root = Path(tmp) / "st-mary"
    try:
        asyncio.run(_story(console, root))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


async def _write_patients(node: Node, bundles: list[PatientBundle], writers: int) -> float:
    todo = iter([r for b in bundles for r in (b.patient, *b.resources)])

    async def writer() -> None:
        for res in todo:
            await node.records.update(res["resourceType"], res["id"], res)

    start = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    return time.perf_counter() - start


def _verify_line(root: Path, checkpoints: tuple[Checkpoint, ...] = ()) -> tuple[bool, str]:
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
            "blockchain.\nEach institution writes to its own fast, private chain; records are "
            "FHIR R4, encrypted off-chain; chains hold only hashes and pseudonyms.\nThis demo runs "
            "one institution's node: encrypted writes, search, proofs, erasure, and tampering caught.",
            title="medledger demo",
        )
    )

    say("\n[bold]1. An institution sets up its node[/]")
    config = init_node(root, name="St. Mary Hospital", passphrase=_PASS, kdf=KdfParams(n=2**14))
    say(
        f"   Created [cyan]{config.institution}[/] in {root}: a passphrase-protected keystore "
        "(scrypt + AES-256-GCM) with its ECDSA P-256 signing key, key-encryption key and search "
        f"key, and a private chain whose genesis block names the signing key "
        f"({config.signing_key.fingerprint[:16]}…)."
    )

    say("\n[bold]2. 32 clinical systems write 40 synthetic patients' records at once[/]")
    bundles = generate_patients(40, seed=2026, resources_per_patient=25)
    node = open_node(root, _PASS)
    elapsed = await _write_patients(node, bundles, 32)
    n = sum(1 + len(b.resources) for b in bundles)
    head = node.chain.head
    say(
        f"   {n:,} FHIR resources (patients, encounters, observations, conditions, medications…) "
        f"validated, each encrypted under its own AES-256-GCM key and committed in {elapsed:.1f} s "
        f"({n / elapsed:,.0f}/s) in {head.height} blocks. The sequencer [italic]group-commits[/]: "
        "whatever is queued becomes one signed block and one fsync, and a writer is answered "
        "only once its block is on disk."
    )
    alice = bundles[0]
    family = alice.patient["name"][0]["family"]
    obs = next(r for r in alice.resources if r["resourceType"] == "Observation")
    stored = await node.records.read("Observation", obs["id"])
    _, tx_data = node.store.tx_by_hash(stored.tx_hash)
    say(
        f"   Reading Observation/{obs['id'][:8]}… of patient {family} decrypts it: "
        f"{obs['code']['coding'][0].get('display', obs['code']['coding'][0]['code'])}."
    )
    say("   What the chain holds for that record — no name, no code, no value:")
    say(f"   [dim]{json.loads(tx_data)['body']}[/]")
    hits = _found_on_disk(root, family)
    say(
        f"   Searching every file of the node for the name {family!r}: "
        f"{'found in ' + ', '.join(hits) if hits else 'not found anywhere'}."
    )

    say("\n[bold]3. Search without a plaintext index[/]")
    found = await node.records.search("Observation", {"patient": [alice.patient_id]})
    by_name = await node.records.search("Patient", {"family": [family[:3]]})
    say(
        f"   Observation?patient={alice.patient_id[:8]}… → {len(found)} results; "
        f"Patient?family={family[:3]} → {len(by_name)} result(s). The index stores only "
        "HMAC tokens of normalized terms under the institution's search key."
    )
    checkpoint = Checkpoint(size=node.chain.head.log_size, root=node.chain.head.log_root)
    say(
        f"   An auditor notes today's checkpoint: size {checkpoint.size}, root "
        f"{checkpoint.root.hex()[:32]}…"
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
        f"   Erasing patient #2 crypto-shreds {erased} resources: their data keys and ciphertexts "
        f"are destroyed and tombstones appended; reading them now gives {gone}, while the chain "
        "still verifies."
    )
    say(
        f"   Rotating the key-encryption key re-wrapped {rotation['rewrapped']:,} data keys without "
        f"re-encrypting any record, and destroyed the old key; reads still work "
        f"(Observation version {again.version})."
    )
    await node.close()

    say("\n[bold]5. Proofs an outsider can check (RFC 6962, as Certificate Transparency uses)[/]")
    _, store = open_chain(root)
    try:
        size = store.counts()[1]
        root_hash = root_at(store, size)
        index, data = store.tx_by_hash(stored.tx_hash)
        proof = inclusion_proof(store, index, size)
        verify_inclusion(leaf_hash(data), index, size, proof, root_hash)
        say(
            f"   The Observation's record.put is entry {index} of {size}: proven with {len(proof)} "
            f"hashes against root {root_hash.hex()[:16]}… — verified."
        )
        cproof = consistency_proof(store, checkpoint.size, size)
        verify_consistency(checkpoint.size, size, cproof, checkpoint.root, root_hash)
        say(
            f"   Today's chain extends the auditor's checkpoint: proven with {len(cproof)} hashes "
            "— nothing earlier was changed."
        )
    finally:
        store.close()
    _, line = _verify_line(root)
    say(f"   [green]medledger verify[/]: {line}")

    say("\n[bold]6. Attacks on the stored chain[/] (each on a copy of the node)")
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
        "… the same, checked against the auditor's earlier checkpoint",
        _verdict(_verify_line(c, (checkpoint,))),
    )
    say(table)
    for p in (a, b, c):
        shutil.rmtree(p, ignore_errors=True)
    say(
        "   A re-signed history is internally perfect; only a root published earlier exposes it. "
        "That is what the consortium chain is for: every institution's roots are anchored there, "
        "final once a quorum of members signs, so no single institution can rewrite its past."
    )

    say("\n[bold]What to try next[/]")
    say("   make test                                  # the whole test suite")
    say("   medledger bench private --quick            # group commit, proofs, verify")
    say("   medledger bench records --quick            # encrypted FHIR writes, reads, search")
    say("   medledger demo --dir ./demo-node           # keep the node, then explore it:")
    say(
        "   MEDLEDGER_PASSPHRASE=demo-passphrase medledger record search --dir ./demo-node "
        "Patient gender=female"
    )
    say("   medledger chain export --dir ./demo-node | head -2; medledger verify --dir ./demo-node")


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
        genesis = json.loads(old.block(0).tx_data[0])["body"]
        txs = [json.loads(old.tx_data(i)) for i in range(1, old.counts()[1])]
    finally:
        old.close()
    txs[50]["body"]["blob"] = "0" * 64  # the record an insider wanted to change
    fresh = paths.chain_db.with_suffix(".new")
    store = SqliteChainStore.create(fresh, f"private:{genesis['institution']}")
    chain = PrivateChain.create(
        store, key, chain_id=store.chain, institution=genesis["institution"], name=genesis["name"]
    )
    # Tasks start in creation order, so the log order is kept while blocks batch.
    await asyncio.gather(*(chain.submit(tx["type"], tx["body"]) for tx in txs))
    await chain.close()
    store.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(paths.chain_db) + suffix).unlink(missing_ok=True)
    fresh.rename(paths.chain_db)
