"""``medledger bench sharing``: verified cross-institution fetches over loopback HTTP.

A local network (``network.LocalNetwork``, ``solo`` ordering) of two
institutions — a holder and a reader — the holder served by uvicorn on a
loopback port, so every fetch travels reader → aiohttp → HTTP → FastAPI
``/peer/v1/fetch`` → holder and back, as between machines. A synthetic
patient's resources live at the holder; the patient enrolls there and grants
the reader consent (final on the consortium).

One fetch (``SharingService.fetch``) is the whole protocol: the reader signs
a request; the holder checks signature, freshness, nonce and consent, wraps
the data key to the reader with HPKE, builds the inclusion proofs against
its latest final anchor, and writes an ``access`` entry on its private chain
(durable before it answers) plus a consortium summary in the background; the
reader verifies the provenance (record tx, RFC 6962 proofs, the anchor's
quorum certificate), unwraps the key, decrypts, and writes its own ``access``
entry. All of that is measured, per HPKE KEM (``MLKEM768_X25519`` and
``X25519``, one fresh network each):

(a) latency at concurrency 1 (p50/p95/p99);
(b) throughput and latency with ``concurrency`` fetches in flight;
(c) the raw HPKE seal + open of a 32-byte data key, in the same run;
(d) how long the holder's consortium summaries took to drain after the last
    fetch, and how many access entries each chain gained.

By default the holder runs as its own ``medledger node start`` process, as
an institution runs it, and the reader (with this harness) in this process:
each institution gets one of the two cores. ``holder_process=False`` puts
both nodes in this process (one core at a time), a lower bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from medledger.benchmarks.common import (
    BENCH_KDF,
    BENCH_PASSPHRASE,
    finish_results,
    gather_timed,
    percentiles,
    results_header,
    work_dir,
    write_json,
)
from medledger.config import NodePaths, institution_id
from medledger.core.consortium import ConsortiumParams
from medledger.core.models import Transaction
from medledger.core.transactions import ACCESS, ACCESS_BATCH
from medledger.ledger.clock import SystemClock
from medledger.localnet.loopback import loopback_socket, serve_nodes, url_of
from medledger.localnet.network import LocalNetwork
from medledger.localnet.nodeproc import NodeProcess
from medledger.node import Node
from medledger.services.hpke import KEMS, HpkeKeyPair, seal_to
from medledger.services.patients import PatientWallet
from medledger.storage.ports import ChainStore
from medledger.storage.sqlite.chain import SqliteChainStore
from medledger.synthetic import generate_patients

__all__ = ["SharingSettings", "hpke_cost_us", "run_sharing_bench"]

_HOUR_MS = 3_600_000
INSTITUTION_NAMES = ("Holder Hospital", "Reader Clinic")


@dataclass(frozen=True, slots=True, kw_only=True)
class SharingSettings:
    kems: tuple[str, ...] = KEMS
    resources: int = 20  # resources of the patient at the holder, fetched round-robin
    latency_fetches: int = 500
    concurrency: tuple[int, ...] = (16, 64)
    throughput_fetches: int = 2_000
    warmup: int = 30
    hpke_rounds: int = 2_000
    #: The holder as its own ``node start`` process (as institutions run), or in this process.
    holder_process: bool = True

    @classmethod
    def quick(cls, base: SharingSettings) -> SharingSettings:
        return cls(
            kems=base.kems,
            resources=min(base.resources, 8),
            latency_fetches=min(base.latency_fetches, 40),
            concurrency=base.concurrency[:1] or (16,),
            throughput_fetches=min(base.throughput_fetches, 80),
            warmup=min(base.warmup, 5),
            hpke_rounds=min(base.hpke_rounds, 100),
            holder_process=base.holder_process,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kems": list(self.kems),
            "resources": self.resources,
            "latency_fetches": self.latency_fetches,
            "concurrency": list(self.concurrency),
            "throughput_fetches": self.throughput_fetches,
            "warmup": self.warmup,
            "hpke_rounds": self.hpke_rounds,
            "holder_process": self.holder_process,
        }


def _now_ms() -> int:
    return SystemClock().now_ms()


def hpke_cost_us(kem: str, rounds: int) -> dict[str, float]:
    """Microseconds per HPKE seal and per open of a 32-byte key for ``kem`` (one core)."""
    pair = HpkeKeyPair(kem, os.urandom(64), os.urandom(32))
    public = pair.public_text()
    info = b'{"medledger-share":"bench"}'
    dek = os.urandom(32)
    sealed = [b""] * rounds
    t = time.perf_counter()
    for i in range(rounds):
        sealed[i] = seal_to(public, dek, info)
    seal = (time.perf_counter() - t) / rounds
    t = time.perf_counter()
    for ct in sealed:
        pair.open(public, ct, info)
    opened = (time.perf_counter() - t) / rounds
    primitive = _primitive_round_trip_s(pair, kem, dek, info, rounds)
    return {
        "seal_us": round(seal * 1e6, 1),
        "open_us": round(opened * 1e6, 1),
        "round_trip_us": round((seal + opened) * 1e6, 1),
        "round_trips_per_s": round(1 / (seal + opened)),
        # The bare cryptography HPKE suite with key objects built once: what
        # seal_to/open cost beyond it is parsing and re-deriving keys per call.
        "primitive_round_trip_us": round(primitive * 1e6, 1),
        "primitive_round_trips_per_s": round(1 / primitive),
        "wrapped_key_bytes": len(sealed[0]),
    }


def _primitive_round_trip_s(
    pair: HpkeKeyPair, kem: str, dek: bytes, info: bytes, rounds: int
) -> float:
    from cryptography.hazmat.primitives import hpke
    from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

    x_private = x25519.X25519PrivateKey.from_private_bytes(pair.x25519_raw)
    private: Any
    if kem == "X25519":
        suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
        private = x_private
    else:
        suite = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
        private = hpke.MLKEM768X25519PrivateKey(
            mlkem.MLKEM768PrivateKey.from_seed_bytes(pair.mlkem_seed), x_private
        )
    public = private.public_key()
    t = time.perf_counter()
    for _ in range(rounds):
        suite.decrypt(suite.encrypt(dek, public, info=info), private, info=info)
    return (time.perf_counter() - t) / rounds


@dataclass
class SharingNet:
    """Two institutions sharing one patient's records: what a fetch benchmark needs."""

    net: LocalNetwork
    holder_id: str
    holder_root: Path
    reader: Node
    consent: str
    records: list[str]
    holder_node: Node | None = None  # the holder, when it runs in this process
    holder_proc: NodeProcess | None = None  # the holder, when it runs as `node start`

    def holder_cpu_s(self) -> float:
        return self.holder_proc.cpu_s() if self.holder_proc is not None else 0.0


async def setup_sharing(
    net: LocalNetwork, holder: Node, reader: Node, base: Path, resources: int
) -> Any:
    """The patient's records at the holder, enrolled there, consent to the reader final."""
    patient = generate_patients(1, seed=7, resources_per_patient=resources)[0]
    stored = []
    for resource in patient.all_resources():
        written, _ = await holder.records.update(resource["resourceType"], resource["id"], resource)
        stored.append(f"{written.resource_type}/{written.id}")
    wallet = PatientWallet.create(base / "patient.wallet", b"bench patient")
    assert holder.sharing is not None and holder.consortium is not None
    await holder.enrollments.enroll(
        patient.patient_id,
        wallet.public,
        wallet.enrollment_signature(
            holder.config.institution, holder.records.patient_pseudonym(patient.patient_id)
        ),
    )
    tx = wallet.grant(
        chain=holder.consortium.chain_id,
        grantee=reader.config.institution,
        scope=["*"],
        purpose="TREAT",
        expires_ms=_now_ms() + 24 * _HOUR_MS,
        time_ms=_now_ms(),
    )
    await holder.consortium.submit(tx)
    assert reader.consortium is not None
    await reader.consortium.wait_final(holder.consortium.final_height, timeout=30)
    await net.wait_anchored()
    return tx.hash().hex(), stored


@contextlib.asynccontextmanager
async def _sharing_network(
    base: Path, kem: str, resources: int, holder_process: bool
) -> AsyncIterator[SharingNet]:
    """Holder and reader in one consortium (solo), a patient's records at the holder.

    With ``holder_process`` the holder is set up here, closed, and started
    as its own ``medledger node start`` process on the peer URL of the
    genesis; otherwise both nodes are served by uvicorn in this process.
    """
    holder_id, reader_id = (institution_id(n) for n in INSTITUTION_NAMES)
    socks = {i: loopback_socket() for i in (holder_id, reader_id)}
    urls = {inst: url_of(sock) for inst, sock in socks.items()}
    net = await LocalNetwork.create(
        base,
        list(INSTITUTION_NAMES),
        passphrase=BENCH_PASSPHRASE,
        kdf=BENCH_KDF,
        params=ConsortiumParams(),
        peer_urls=urls,
        hpke_kem=kem,
    )
    try:
        holder, reader = net.nodes[holder_id], net.nodes[reader_id]

        def ready(consent: str, stored: list[str], **where: Any) -> SharingNet:
            return SharingNet(
                net=net,
                holder_id=holder_id,
                holder_root=holder.paths.root,
                reader=reader,
                consent=consent,
                records=stored,
                **where,
            )

        if not holder_process:
            async with serve_nodes(net.nodes, socks, base):
                consent, stored = await setup_sharing(net, holder, reader, base, resources)
                yield ready(consent, stored, holder_node=holder)
            return
        consent, stored = await setup_sharing(net, holder, reader, base, resources)
        await holder.close()
        del net.nodes[holder_id]
        port = socks[holder_id].getsockname()[1]
        for sock in socks.values():
            sock.close()  # the holder process binds its port itself
        proc = await asyncio.to_thread(
            NodeProcess,
            holder.paths.root,
            passphrase=BENCH_PASSPHRASE,
            port=port,
            env={"MEDLEDGER_ORDERING": "solo", "MEDLEDGER_ORDER_FILE": str(base / "order.db")},
            ready_path="/readyz",
            # The genesis names its https peer URL: the reader's mutual TLS must meet TLS.
            tls=True,
        )
        try:
            yield ready(consent, stored, holder_proc=proc)
        finally:
            await asyncio.to_thread(proc.stop)
    finally:
        await net.close()


async def timed_fetches(
    n: SharingNet, count: int, concurrency: int, offset: int = 0
) -> dict[str, Any]:
    """``count`` verified fetches, ``concurrency`` in flight; throughput and latency."""
    assert n.reader.sharing is not None
    sharing = n.reader.sharing
    holder = n.holder_id
    todo = iter(range(offset, offset + count))
    lat: list[float] = []
    errors: list[str] = []

    async def client() -> None:
        for k in todo:
            resource = n.records[k % len(n.records)]
            t = time.perf_counter()
            try:
                shared = await sharing.fetch(holder, n.consent, resource)
            except Exception as exc:  # counted and reported, never hidden
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            lat.append(time.perf_counter() - t)
            if f"{shared.resource['resourceType']}/{shared.resource['id']}" != resource:
                errors.append(f"fetched the wrong resource for {resource}")

    holder_cpu = n.holder_cpu_s()
    elapsed, cpu = await gather_timed(client() for _ in range(concurrency))
    holder_cpu = n.holder_cpu_s() - holder_cpu
    done = max(len(lat), 1)
    return {
        "concurrency": concurrency,
        "fetches": len(lat),
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "fetches_per_s": round(len(lat) / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_ms": percentiles(lat),
        # This process: the reader (and, in one process, the holder too).
        "cpu_ms_per_fetch": round(cpu * 1000 / done, 3),
        "holder_process_cpu_ms_per_fetch": round(holder_cpu * 1000 / done, 3),
    }


def _access_entries(store: ChainStore) -> int:
    """``access`` transactions on a chain (counted from its blocks)."""
    return sum(
        Transaction.decode(data).type == "access"
        for block in store.iter_blocks(1)
        for data in block.tx_data
    )


def _summaries(store: ChainStore) -> tuple[int, int]:
    """Access summaries on a consortium chain: ``(entries, access.batch txs)``."""
    entries = batches = 0
    for block in store.iter_blocks(1):
        for data in block.tx_data:
            tx = Transaction.decode(data)
            if tx.type == ACCESS_BATCH:
                batches += 1
                entries += len(tx.body["entries"])
            elif tx.type == ACCESS:
                entries += 1
    return entries, batches


async def _summaries_final(reader: Node, expected: int, timeout: float = 60.0) -> float:
    """Seconds until ``expected`` access summaries are final in the reader's consortium view."""
    store = reader.consortium_store
    assert store is not None
    t = time.perf_counter()
    while _summaries(store)[0] < expected and time.perf_counter() - t < timeout:
        await asyncio.sleep(0.05)
    return time.perf_counter() - t


async def _run_kem(base: Path, kem: str, settings: SharingSettings, console: Console) -> Any:
    async with _sharing_network(base, kem, settings.resources, settings.holder_process) as n:
        warm = await timed_fetches(n, settings.warmup, 1)
        if warm["errors"]:
            raise RuntimeError(f"{kem}: warm-up fetch failed: {warm['first_error']}")
        done = settings.warmup
        single = await timed_fetches(n, settings.latency_fetches, 1, done)
        done += settings.latency_fetches
        console.log(
            f"{kem}: concurrency 1 → p50 {single['latency_ms']['p50']} ms, "
            f"p99 {single['latency_ms']['p99']} ms, {single['fetches_per_s']}/s"
        )
        loaded = []
        for c in settings.concurrency:
            run = await timed_fetches(n, settings.throughput_fetches, c, done)
            done += settings.throughput_fetches
            loaded.append(run)
            console.log(
                f"{kem}: concurrency {c} → {run['fetches_per_s']}/s, "
                f"p50 {run['latency_ms']['p50']} ms, p99 {run['latency_ms']['p99']} ms"
            )
        if n.holder_node is not None:
            await n.holder_node.access.drain()
        drain_s = await _summaries_final(n.reader, done)
        assert n.reader.consortium_store is not None
        summaries, batches = _summaries(n.reader.consortium_store)
        reader_entries = _access_entries(n.reader.store)
    holder_store = SqliteChainStore.open(NodePaths(root=n.holder_root).chain_db)
    try:
        holder_entries = _access_entries(holder_store)
    finally:
        holder_store.close()
    return {
        "kem": kem,
        "wrapped_for": (n.reader.config.hpke_key or "").partition(":")[0],
        "holder_process": settings.holder_process,
        "single": single,
        "loaded": loaded,
        "fetches_total": done,
        "summaries_final_after_last_fetch_s": round(drain_s, 3),
        "holder_access_entries": holder_entries,
        "reader_access_entries": reader_entries,
        "consortium_access_summaries_final": summaries,
        "consortium_access_batches": batches,
    }


def run_sharing_bench(
    *, root: Path | None, settings: SharingSettings, json_out: Path | None, quick: bool
) -> dict[str, Any]:
    """Measure every KEM in ``settings`` (one fresh network each); write JSON."""
    if quick:
        settings = SharingSettings.quick(settings)
    console = Console(stderr=True)
    results = results_header(settings.to_json(), quick)
    results["hpke"] = {kem: hpke_cost_us(kem, settings.hpke_rounds) for kem in settings.kems}
    results["runs"] = []
    started = time.perf_counter()
    with work_dir(root, "sharing") as base:
        for kem in settings.kems:
            results["runs"].append(asyncio.run(_run_kem(base / kem, kem, settings, console)))
    finish_results(results, started)
    results["comparison"] = _compare(results)
    _print(results)
    if json_out is not None:
        write_json(json_out, results)
    return results


def _compare(results: dict[str, Any]) -> dict[str, Any]:
    """The post-quantum default against X25519, from this run."""
    runs = {r["kem"]: r for r in results["runs"]}
    pq, classic = runs.get("MLKEM768_X25519"), runs.get("X25519")
    if pq is None or classic is None:
        return {}
    h = results["hpke"]
    return {
        "p50_extra_ms": round(
            pq["single"]["latency_ms"]["p50"] - classic["single"]["latency_ms"]["p50"], 3
        ),
        "hpke_round_trip_extra_us": round(
            h["MLKEM768_X25519"]["round_trip_us"] - h["X25519"]["round_trip_us"], 1
        ),
        "throughput_ratio": [
            {
                "concurrency": a["concurrency"],
                "mlkem_over_x25519": round(a["fetches_per_s"] / b["fetches_per_s"], 3)
                if b["fetches_per_s"]
                else None,
            }
            for a, b in zip(pq["loaded"], classic["loaded"], strict=False)
        ],
    }


def _print(results: dict[str, Any]) -> None:
    t = Table(title="medledger bench sharing (verified fetch over loopback HTTP)")
    cols = (
        "KEM",
        "in flight",
        "fetches/s",
        "p50 / p95 / p99 ms",
        "CPU ms reader / holder",
        "errors",
    )
    for col in cols:
        t.add_column(col, justify="right")
    for run in results["runs"]:
        for r in (run["single"], *run["loaded"]):
            lat = r["latency_ms"]
            t.add_row(
                run["kem"],
                str(r["concurrency"]),
                f"{r['fetches_per_s']:,}",
                f"{lat['p50']} / {lat['p95']} / {lat['p99']}",
                f"{r['cpu_ms_per_fetch']} / {r['holder_process_cpu_ms_per_fetch']}",
                str(r["errors"]),
            )
    Console().print(t)
    for kem, h in results["hpke"].items():
        Console().print(
            f"HPKE {kem}: seal {h['seal_us']} µs + open {h['open_us']} µs "
            f"= {h['round_trips_per_s']:,} round trips/s"
        )
