"""``medledger bench private``: the private chain's write path, proofs and verify.

Measures, in one run and in-process: sustained throughput with many
concurrent writers (group commit, one fsync per block, acks durable); the
same workload with one commit per transaction (``max_txs=1``) as the
baseline group commit must beat; acknowledgement latency at a fixed offered
load (open loop, so a slow ack cannot hide later ones); inclusion-proof time
and full ``verify`` time over a large log; and throughput as writers grow.

``--store postgres`` runs the same workloads on PostgreSQL (an embedded server
started for the run unless ``--dsn`` is given); ``--store both`` runs SQLite
and PostgreSQL one after the other and reports them side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from medledger.benchmarks.common import (
    BENCH_KDF,
    BENCH_PASSPHRASE,
    fsync_latency_ms,
    machine,
    percentiles,
    write_json,
)
from medledger.config import StorageConfig, institution_id
from medledger.core.merkle import leaf_hash, verify_inclusion
from medledger.ledger.private import PrivateChain, SequencerConfig
from medledger.ledger.proofs import head_header, inclusion_proof
from medledger.ledger.verify import verify_chain
from medledger.node import init_node, open_node

__all__ = ["run_private_bench"]


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


@contextlib.contextmanager
def _dsn_env(storage: StorageConfig) -> Iterator[None]:
    """node.toml keeps no password: hand the full DSN to ``open_node`` the documented way."""
    if storage.store != "postgres":
        yield
        return
    before = os.environ.get("MEDLEDGER_DSN")
    os.environ["MEDLEDGER_DSN"] = storage.dsn
    try:
        yield
    finally:
        if before is None:
            del os.environ["MEDLEDGER_DSN"]
        else:
            os.environ["MEDLEDGER_DSN"] = before


def _fresh(path: Path, name: str, storage: StorageConfig) -> None:
    """Remove a node left by an earlier run: its directory and its PostgreSQL schemas."""
    if path.exists():
        shutil.rmtree(path)
    if storage.store == "postgres":
        from medledger.storage.factory import NODE_SCHEMA_PARTS, node_schema
        from medledger.storage.postgres.migrations import drop_schema

        for part in NODE_SCHEMA_PARTS:
            drop_schema(storage.dsn, node_schema(institution_id(name), part))


def _with_node(
    root: Path,
    name: str,
    max_txs: int,
    fn: Callable[[PrivateChain], Awaitable[Any]],
    storage: StorageConfig | None = None,
) -> Any:
    storage = storage or StorageConfig()
    path = root / name
    _fresh(path, name, storage)
    init_node(
        path,
        name=name,
        passphrase=BENCH_PASSPHRASE,
        kdf=BENCH_KDF,
        sequencer=SequencerConfig(max_txs=max_txs),
        storage=storage,
    )

    async def go() -> Any:
        node = open_node(path, BENCH_PASSPHRASE)
        try:
            return await fn(node.writer_chain)
        finally:
            await node.close()

    with _dsn_env(storage):
        return asyncio.run(go())


def _proofs_and_verify(
    root: Path, log_size: int, console: Console, storage: StorageConfig | None = None
) -> dict[str, Any]:
    storage = storage or StorageConfig()
    with _dsn_env(storage):
        return _proofs_and_verify_in(root, log_size, console, storage)


def _proofs_and_verify_in(
    root: Path, log_size: int, console: Console, storage: StorageConfig
) -> dict[str, Any]:
    path = root / "proof-log"
    if storage.store == "postgres":
        _fresh(path, "proof-log", storage)  # the server may be new: never reuse
    if not path.exists():
        init_node(
            path,
            name="proof-log",
            passphrase=BENCH_PASSPHRASE,
            kdf=BENCH_KDF,
            storage=storage,
        )
    node = open_node(path, BENCH_PASSPHRASE)
    missing = log_size - node.chain.head.log_size
    if missing > 0:
        console.print(f"  building a {log_size:,}-transaction log ({missing:,} to write)…")

        async def fill() -> None:
            await _closed_loop(node.writer_chain, missing, 1024)
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


def _run_store(
    root: Path,
    storage: StorageConfig,
    console: Console,
    *,
    txs: int,
    writers: int,
    rate: int,
    proof_log: int,
) -> dict[str, Any]:
    """Every workload on one store kind."""
    results: dict[str, Any] = {}
    tag = f"[cyan]{storage.store}[/] "
    console.print(f"{tag}[bold]group commit[/]: {txs:,} txs, {writers} writers")
    results["group_commit"] = _with_node(
        root, "group", 4096, lambda c: _closed_loop(c, txs, writers), storage
    )
    compare = []
    base_txs = max(500, min(txs // 20, 5_000))
    for w in (16, writers):
        console.print(f"{tag}[bold]group vs one fsync per tx[/]: {base_txs:,} txs, {w} writers")
        run = partial(_closed_loop, txs=base_txs, writers=w)
        g = _with_node(root, f"g{w}", 4096, run, storage)
        s = _with_node(root, f"s{w}", 1, run, storage)
        compare.append(
            {
                "writers": w,
                "group_tx_per_s": g["tx_per_s"],
                "per_tx_fsync_tx_per_s": s["tx_per_s"],
                "ratio": round(g["tx_per_s"] / s["tx_per_s"], 1),
            }
        )
    results["group_vs_per_tx"] = compare
    sweep_txs = max(1_000, min(txs // 10, 20_000))
    scaling = []
    for w in (1, 16, 64, 256, 1024):
        n = sweep_txs if w >= 16 else min(sweep_txs, 1_000)  # one writer: one commit per tx
        console.print(f"{tag}[bold]writers[/]: {n:,} txs, {w} writers")
        r = _with_node(root, f"w{w}", 4096, partial(_closed_loop, txs=n, writers=w), storage)
        scaling.append({"writers": w, "tx_per_s": r["tx_per_s"], "ack_p99_ms": r["ack_ms"]["p99"]})
    results["writer_scaling"] = scaling
    console.print(f"{tag}[bold]offered load[/]: {rate:,} tx/s for 3 s")
    results["offered_load"] = _with_node(
        root, "load", 4096, lambda c: _open_loop(c, rate, 3.0), storage
    )
    if proof_log:
        console.print(f"{tag}[bold]proofs and verify[/] over {proof_log:,} transactions")
        results["proofs"] = _proofs_and_verify(root, proof_log, console, storage)
    return results


@contextlib.contextmanager
def _postgres_dsn(dsn: str | None, console: Console) -> Iterator[tuple[str, str]]:
    """``(dsn, description)``: the given DSN, or an embedded server started for this run."""
    if dsn is not None:
        from medledger.storage.postgres.connection import describe_dsn

        yield dsn, describe_dsn(dsn)
        return
    from medledger.localnet.pg_embedded import EmbeddedPostgres

    console.print("starting an embedded PostgreSQL server for this run…")
    with EmbeddedPostgres.start_new() as server:
        yield server.create_database("medledger_bench"), "embedded PostgreSQL (fsync on)"


def run_private_bench(
    *,
    root: Path | None,
    txs: int,
    writers: int,
    rate: int,
    proof_log: int,
    json_out: Path | None,
    quick: bool,
    store: str = "sqlite",
    dsn: str | None = None,
) -> dict[str, Any]:
    """Run the private-chain benchmark on ``store`` (sqlite | postgres | both); print; return.

    With one store the results keep their flat shape; every run also has them
    per store under ``"stores"``.
    """
    console = Console(stderr=True)
    if quick:
        txs, rate, proof_log = min(txs, 5_000), min(rate, 500), min(proof_log, 5_000)
    kinds = ["sqlite", "postgres"] if store == "both" else [store]
    tmp = None
    if root is None:
        tmp = tempfile.mkdtemp(prefix="medledger-bench-")
        root = Path(tmp)
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "fsync_ms": fsync_latency_ms(root)}
    stores: dict[str, Any] = {}
    try:
        with contextlib.ExitStack() as stack:
            for kind in kinds:
                storage = StorageConfig()
                if kind == "postgres":
                    pg, where = stack.enter_context(_postgres_dsn(dsn, console))
                    storage = StorageConfig(store="postgres", dsn=pg)
                    results["postgres"] = where
                stores[kind] = _run_store(
                    root / kind,
                    storage,
                    console,
                    txs=txs,
                    writers=writers,
                    rate=rate,
                    proof_log=proof_log,
                )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    results["stores"] = stores
    if len(kinds) == 1:
        results.update(stores[kinds[0]])
        _print(console, results, kinds[0])
    else:
        _print_side_by_side(results)
    if json_out is not None:
        write_json(json_out, results)
    return results


def _print(console: Console, r: dict[str, Any], store: str = "sqlite") -> None:
    t = Table(title=f"medledger bench private ({store})")
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
    for w in r.get("writer_scaling", []):
        t.add_row(f"throughput, {w['writers']} writers", f"{w['tx_per_s']:,} tx/s")
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


def _side_rows(r: dict[str, Any]) -> list[tuple[str, float | None, str]]:
    """(measure, number to compare, shown text) for one store's results."""
    rows: list[tuple[str, float | None, str]] = []
    g = r["group_commit"]
    rows.append((f"throughput, {g['writers']} writers", g["tx_per_s"], f"{g['tx_per_s']:,} tx/s"))
    rows.append(("mean txs per block", g["mean_block_txs"], f"{g['mean_block_txs']}"))
    rows.append(
        ("ack p50 / p99 (closed loop)", None, f"{g['ack_ms']['p50']} / {g['ack_ms']['p99']} ms")
    )
    for c in r["group_vs_per_tx"]:
        rows.append(
            (
                f"one commit per tx, {c['writers']} writers",
                c["per_tx_fsync_tx_per_s"],
                f"{c['per_tx_fsync_tx_per_s']:,} tx/s",
            )
        )
    for w in r["writer_scaling"]:
        rows.append(
            (f"throughput, {w['writers']} writers", w["tx_per_s"], f"{w['tx_per_s']:,} tx/s")
        )
    o = r["offered_load"]
    rows.append(
        (
            f"ack p50 / p99 at {o['offered_tx_per_s']:,} tx/s",
            None,
            f"{o['ack_ms']['p50']} / {o['ack_ms']['p99']} ms",
        )
    )
    if "proofs" in r:
        p = r["proofs"]
        rows.append(
            (f"inclusion proof, log of {p['log_size']:,}", None, f"{p['inclusion_proof_ms']} ms")
        )
        rows.append(
            (f"full verify, {p['log_size']:,} txs", p["verify_tx_per_s"], f"{p['verify_s']} s")
        )
    return rows


def _print_side_by_side(r: dict[str, Any]) -> None:
    t = Table(title="medledger bench private: SQLite and PostgreSQL, one run")
    t.add_column("measure")
    t.add_column("SQLite", justify="right")
    t.add_column("PostgreSQL", justify="right")
    t.add_column("PG / SQLite", justify="right")
    lite, pg = _side_rows(r["stores"]["sqlite"]), _side_rows(r["stores"]["postgres"])
    for (name, a, text_a), (_, b, text_b) in zip(lite, pg, strict=True):
        ratio = f"{b / a:.0%}" if a and b is not None else ""
        t.add_row(name, text_a, text_b, ratio)
    t.add_row("fsync (4 KiB) median", f"{r['fsync_ms']} ms", r.get("postgres", ""), "")
    Console().print(t)
