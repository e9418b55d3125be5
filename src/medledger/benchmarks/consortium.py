"""``medledger bench consortium``: submit-to-final latency and final throughput.

Members run in this process, each with its own consortium store, over one
ordering service: ``solo`` or a real 3-node NATS JetStream cluster (R3) with
one connection per member. The workload is ``access`` transactions (a
cross-institution read summary, signed by a member), so every transaction is
fully validated and every block needs a quorum of ECDSA votes.

* Latency: open loop at a fixed offered load; time from ``submit`` to the
  transaction being in a final block at the submitting member.
* Throughput: many concurrent submitters (closed loop); final tx/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from medledger.benchmarks.common import machine, percentiles, write_json
from medledger.core.consortium import ConsortiumParams, Genesis, Member
from medledger.core.keys import SigningKey
from medledger.core.models import Transaction
from medledger.core.transactions import ACCESS
from medledger.ledger.clock import SystemClock
from medledger.ledger.consortium.member import ConsortiumMember
from medledger.ledger.ordering.port import Orderer
from medledger.ledger.ordering.solo import SoloOrderer
from medledger.storage.sqlite.chain import SqliteChainStore

__all__ = ["run_consortium_bench"]


class _Net:
    def __init__(self, root: Path, n: int, ordering: str) -> None:
        self.root, self.n, self.ordering = root, n, ordering
        self.keys = [SigningKey.generate() for _ in range(n)]
        self.genesis = Genesis(
            consortium="bench",
            time_ms=SystemClock().now_ms(),
            members=tuple(
                Member(id=f"m{i}", name=f"member {i}", signing_key=k.public)
                for i, k in enumerate(self.keys)
            ),
            params=ConsortiumParams(max_block_txs=500, cut_after_ms=5),
        )
        self.members: list[ConsortiumMember] = []
        self.orderers: list[Orderer] = []
        self.stores: list[SqliteChainStore] = []
        self.cluster: Any = None

    async def start(self) -> None:
        if self.ordering == "solo":
            self.orderers = [SoloOrderer(self.root / "order.db")] * self.n
        else:
            from medledger.ledger.ordering.jetstream import JetStreamOrderer
            from medledger.localnet.natsserver import NatsCluster

            self.cluster = NatsCluster(self.root / "nats", size=3)
            await asyncio.to_thread(self.cluster.start)
            self.orderers = [
                await JetStreamOrderer.connect(
                    self.cluster.client_urls(), stream="BENCH", subject="bench.order", replicas=3
                )
                for _ in range(self.n)
            ]
        for i, key in enumerate(self.keys):
            store = SqliteChainStore.create(self.root / f"m{i}.db", self.genesis.chain_id)
            self.stores.append(store)
            member = ConsortiumMember(
                genesis=self.genesis,
                member_id=f"m{i}",
                key=key,
                orderer=self.orderers[i],
                store=store,
            )
            await member.start()
            self.members.append(member)

    def tx(self, i: int, seq: int) -> Transaction:
        member = i % self.n
        unsigned = Transaction(
            type=ACCESS,
            chain=self.genesis.chain_id,
            body={
                "reader": f"m{(member + 1) % self.n}",
                "holder": f"m{member}",
                "patient": f"{seq:064x}",
                "consent": "",
                "resource": f"{seq:064x}",
                "outcome": "allowed",
            },
            time_ms=SystemClock().now_ms(),
        )
        return unsigned.signed_by(self.keys[member])

    async def close(self) -> None:
        for m in self.members:
            await m.close()
        for o in {id(o): o for o in self.orderers}.values():
            await o.close()
        for s in self.stores:
            s.close()
        if self.cluster is not None:
            self.cluster.stop()


async def _latency(net: _Net, rate: int, seconds: float) -> dict[str, Any]:
    total = int(rate * seconds)
    lat: list[float] = []
    start = time.perf_counter()
    tasks = []

    async def one(i: int, due: float) -> None:
        await net.members[i % net.n].submit(net.tx(i, i))
        lat.append(time.perf_counter() - due)

    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i, due)))
    await asyncio.gather(*tasks)
    return {"offered_tx_per_s": rate, "txs": total, "final_ms": percentiles(lat)}


async def _throughput(net: _Net, txs: int, concurrency: int) -> dict[str, Any]:
    counter = iter(range(10**6, 10**6 + txs))

    async def worker(w: int) -> None:
        for i in counter:
            await net.members[w % net.n].submit(net.tx(w, i))

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"txs": txs, "concurrency": concurrency, "final_tx_per_s": round(txs / elapsed)}


async def _one(
    root: Path, n: int, ordering: str, rate: int, seconds: float, txs: int, console: Console
) -> dict[str, Any]:
    path = root / f"{ordering}-{n}"
    path.mkdir(parents=True)
    net = _Net(path, n, ordering)
    try:
        await net.start()
        console.print(f"[bold]{ordering}, {n} members[/]: {rate:,} tx/s offered for {seconds:g} s")
        latency = await _latency(net, rate, seconds)
        console.print(f"[bold]{ordering}, {n} members[/]: {txs:,} txs closed loop")
        throughput = await _throughput(net, txs, 400)
        return {
            "ordering": ordering,
            "members": n,
            **latency,
            **throughput,
            "final_height": net.members[0].final_height,
        }
    finally:
        await net.close()


def run_consortium_bench(
    *,
    root: Path | None,
    orderings: tuple[str, ...],
    sizes: tuple[int, ...],
    rate: int,
    seconds: float,
    txs: int,
    json_out: Path | None,
    quick: bool,
) -> dict[str, Any]:
    console = Console(stderr=True)
    if quick:  # a smoke run: every ordering, the smallest consortium only
        seconds, txs, rate = min(seconds, 1.0), min(txs, 500), min(rate, 300)
        sizes = sizes[:1]
    random.seed(5)
    tmp = None
    if root is None:
        tmp = tempfile.mkdtemp(prefix="medledger-bench-consortium-")
        root = Path(tmp)
    results: dict[str, Any] = {"machine": machine(), "runs": []}
    try:
        for ordering in orderings:
            for n in sizes:
                results["runs"].append(
                    asyncio.run(_one(root, n, ordering, rate, seconds, txs, console))
                )
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp)
    table = Table(title="medledger bench consortium (submit → final)")
    for col in ("ordering", "members", "offered tx/s", "p50 ms", "p99 ms", "final tx/s"):
        table.add_column(col, justify="right")
    for r in results["runs"]:
        table.add_row(
            r["ordering"],
            str(r["members"]),
            f"{r['offered_tx_per_s']:,}",
            str(r["final_ms"]["p50"]),
            str(r["final_ms"]["p99"]),
            f"{r['final_tx_per_s']:,}",
        )
    Console().print(table)
    if json_out is not None:
        write_json(json_out, results)
    return results
