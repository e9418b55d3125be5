"""``medledger bench private``: the private chain's write path, proofs and verify.

Measures, in one run and in-process: sustained throughput with many
concurrent writers (group commit, one fsync per block, acks durable); the
same workload with one commit per transaction (``max_txs=1``) as the
baseline group commit must beat; acknowledgement latency at a fixed offered
load (open loop, so a slow ack cannot hide later ones); inclusion-proof time
and full ``verify`` time over a large log.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from medledger.benchmarks.common import fsync_latency_ms, machine, percentiles, write_json
from medledger.core.merkle import leaf_hash, verify_inclusion
from medledger.ledger.private import PrivateChain, SequencerConfig
from medledger.ledger.proofs import head_header, inclusion_proof
from medledger.ledger.verify import verify_chain
from medledger.node import init_node, open_node
from medledger.storage.keystore import KdfParams

__all__ = ["run_private_bench"]

_PASS = b"bench-only-passphrase"


def _body(i: int) -> dict[str, Any]:
    # The shape of a record.put: hashes and pseudonyms only, never PHI.
    h = f"{i:064x}"
    return {
        "resource_type": "Observation",
        "id": f"obs-{i}",
        "version": 1,
        "blob": h,
        "patient": h[::-1],
    }


async def _closed_loop(chain: PrivateChain, txs: int, writers: int) -> dict[str, Any]:
    counter = iter(range(txs))
    latencies: list[float] = []

    async def writer() -> None:
        for i in counter:
            t = time.perf_counter()
            await chain.submit("record.put", _body(i))
            latencies.append(time.perf_counter() - t)

    h0 = chain.head.height
    start = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    elapsed = time.perf_counter() - start
    blocks = chain.head.height - h0
    return {
        "writers": writers,
        "txs": txs,
        "seconds": round(elapsed, 3),
        "tx_per_s": round(txs / elapsed),
        "blocks": blocks,
        "mean_block_txs": round(txs / max(blocks, 1), 1),
        "ack_ms": percentiles(latencies),
    }


async def _open_loop(chain: PrivateChain, rate: int, seconds: float) -> dict[str, Any]:
    total = int(rate * seconds)
    latencies: list[float] = []
    tasks = []

    async def one(i: int, due: float) -> None:
        await chain.submit("record.put", _body(i))
        # Measured from when the write was *due*, so queueing delay counts.
        latencies.append(time.perf_counter() - due)

    start = time.perf_counter()
    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i, due)))
    await asyncio.gather(*tasks)
    return {"offered_tx_per_s": rate, "txs": total, "ack_ms": percentiles(latencies)}


def _with_node(
    root: Path, name: str, max_txs: int, fn: Callable[[PrivateChain], Awaitable[Any]]
) -> Any:
    path = root / name
    if path.exists():
        shutil.rmtree(path)
    init_node(
        path,
        name=name,
        passphrase=_PASS,
        kdf=KdfParams(n=2**12),
        sequencer=SequencerConfig(max_txs=max_txs),
    )

    async def go() -> Any:
        node = open_node(path, _PASS)
        try:
            return await fn(node.chain)
        finally:
            await node.close()

    return asyncio.run(go())


def _proofs_and_verify(root: Path, log_size: int, console: Console) -> dict[str, Any]:
    path = root / "proof-log"
    if not path.exists():
        init_node(path, name="proof-log", passphrase=_PASS, kdf=KdfParams(n=2**12))
    node = open_node(path, _PASS)
    missing = log_size - node.chain.head.log_size
    if missing > 0:
        console.print(f"  building a {log_size:,}-transaction log ({missing:,} to write)…")

        async def fill() -> None:
            await _closed_loop(node.chain, missing, 1024)
            await node.close()

        asyncio.run(fill())
    else:
        asyncio.run(node.close())
    from medledger.node import open_chain

    config, store = open_chain(path)
    try:
        size = head_header(store).log_size
        rng = random.Random(6962)  # noqa: S311 - reproducible sampling, not cryptography
        indexes = [rng.randrange(size) for _ in range(2000)]
        start = time.perf_counter()
        for i in indexes:
            inclusion_proof(store, i, size)
        per_proof = (time.perf_counter() - start) / len(indexes)
        from medledger.ledger.proofs import root_at

        root_hash = root_at(store, size)
        for i in indexes[:50]:  # the proofs timed above are also correct
            verify_inclusion(
                leaf_hash(store.tx_data(i)), i, size, inclusion_proof(store, i, size), root_hash
            )
        start = time.perf_counter()
        report = verify_chain(store, expected_key=config.signing_key)
        verify_s = time.perf_counter() - start
    finally:
        store.close()
    return {
        "log_size": size,
        "blocks": report.blocks,
        "inclusion_proof_ms": round(per_proof * 1000, 4),
        "verify_s": round(verify_s, 2),
        "verify_tx_per_s": round(size / verify_s),
    }


def run_private_bench(
    *,
    root: Path | None,
    txs: int,
    writers: int,
    rate: int,
    proof_log: int,
    json_out: Path | None,
    quick: bool,
) -> dict[str, Any]:
    """Run the private-chain benchmark; print a table; return (and optionally save) results."""
    console = Console(stderr=True)
    if quick:
        txs, rate, proof_log = min(txs, 5_000), min(rate, 500), min(proof_log, 5_000)
    tmp = None
    if root is None:
        tmp = tempfile.mkdtemp(prefix="medledger-bench-")
        root = Path(tmp)
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "fsync_ms": fsync_latency_ms(root)}
    try:
        console.print(f"[bold]group commit[/]: {txs:,} txs, {writers} writers")
        results["group_commit"] = _with_node(
            root, "group", 4096, lambda c: _closed_loop(c, txs, writers)
        )
        compare = []
        base_txs = max(500, min(txs // 20, 5_000))
        for w in (16, writers):
            console.print(f"[bold]group vs one fsync per tx[/]: {base_txs:,} txs, {w} writers")
            run = partial(_closed_loop, txs=base_txs, writers=w)
            g = _with_node(root, f"g{w}", 4096, run)
            s = _with_node(root, f"s{w}", 1, run)
            compare.append(
                {
                    "writers": w,
                    "group_tx_per_s": g["tx_per_s"],
                    "per_tx_fsync_tx_per_s": s["tx_per_s"],
                    "ratio": round(g["tx_per_s"] / s["tx_per_s"], 1),
                }
            )
        results["group_vs_per_tx"] = compare
        console.print(f"[bold]offered load[/]: {rate:,} tx/s for 3 s")
        results["offered_load"] = _with_node(root, "load", 4096, lambda c: _open_loop(c, rate, 3.0))
        if proof_log:
            console.print(f"[bold]proofs and verify[/] over {proof_log:,} transactions")
            results["proofs"] = _proofs_and_verify(root, proof_log, console)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    _print(console, results)
    if json_out is not None:
        write_json(json_out, results)
    return results


def _print(console: Console, r: dict[str, Any]) -> None:
    t = Table(title="medledger bench private")
    t.add_column("measure")
    t.add_column("value", justify="right")
    g = r["group_commit"]
    t.add_row(f"throughput, {g['writers']} writers", f"{g['tx_per_s']:,} tx/s")
    t.add_row("mean txs per block", f"{g['mean_block_txs']}")
    t.add_row(
        "ack latency p50 / p99 (closed loop)", f"{g['ack_ms']['p50']} / {g['ack_ms']['p99']} ms"
    )
    for c in r["group_vs_per_tx"]:
        t.add_row(
            f"group vs per-tx fsync, {c['writers']} writers",
            f"{c['group_tx_per_s']:,} vs {c['per_tx_fsync_tx_per_s']:,} tx/s ({c['ratio']}x)",
        )
    o = r["offered_load"]
    t.add_row(
        f"ack latency at {o['offered_tx_per_s']:,} tx/s p50 / p99",
        f"{o['ack_ms']['p50']} / {o['ack_ms']['p99']} ms",
    )
    if "proofs" in r:
        p = r["proofs"]
        t.add_row(f"inclusion proof, log of {p['log_size']:,}", f"{p['inclusion_proof_ms']} ms")
        t.add_row(f"full verify, {p['log_size']:,} txs", f"{p['verify_s']} s")
    t.add_row("fsync (4 KiB) median", f"{r['fsync_ms']} ms")
    Console().print(t)
