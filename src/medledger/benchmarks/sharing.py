"""``medledger bench sharing``: verified cross-institution fetches over loopback HTTP.

A local network (``network.LocalNetwork``, ``solo`` ordering) of two
institutions — a holder and a reader — each served by its own uvicorn server
on a loopback socket of this process (TCP_NODELAY), so every fetch travels
reader → httpx → HTTP → FastAPI ``/peer/v1/fetch`` → holder and back, as
between machines. A synthetic patient's resources live at the holder; the
patient enrolls there and grants the reader consent (final on the consortium).

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

Holder, reader and the consortium all share this one Python process (one
core at a time); the figures are a lower bound for two machines.
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

from medledger.api.loopback import loopback_socket, serve_nodes, url_of
from medledger.benchmarks.common import (
    finish_results,
    gather_timed,
    percentiles,
    results_header,
    work_dir,
    write_json,
)
from medledger.config import institution_id
from medledger.core.consortium import ConsortiumParams
from medledger.network import LocalNetwork
from medledger.node import Node
from medledger.services.hpke import KEMS, HpkeKeyPair, seal_to
from medledger.services.patients import PatientWallet
from medledger.services.synthetic import generate_patients
from medledger.storage.keystore import KdfParams

__all__ = ["SharingSettings", "hpke_cost_us", "run_sharing_bench"]

_PASS = b"bench-only-passphrase"
_KDF = KdfParams(n=2**12)
_HOUR_MS = 3_600_000
_NAMES = ("Holder Hospital", "Reader Clinic")


@dataclass(frozen=True, slots=True, kw_only=True)
class SharingSettings:
    kems: tuple[str, ...] = KEMS
    resources: int = 20  # resources of the patient at the holder, fetched round-robin
    latency_fetches: int = 500
    concurrency: tuple[int, ...] = (16,)
    throughput_fetches: int = 2_000
    warmup: int = 30
    hpke_rounds: int = 2_000

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
        }


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


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
class _Net:
    net: LocalNetwork
    holder: Node
    reader: Node
    consent: str
    records: list[str]


@contextlib.asynccontextmanager
async def _sharing_network(base: Path, kem: str, resources: int) -> AsyncIterator[_Net]:
    """Two served nodes, a patient's records at the holder, consent to the reader."""
    socks = {institution_id(name): loopback_socket() for name in _NAMES}
    urls = {inst: url_of(sock) for inst, sock in socks.items()}
    net = await LocalNetwork.create(
        base,
        list(_NAMES),
        passphrase=_PASS,
        kdf=_KDF,
        params=ConsortiumParams(),
        peer_urls=urls,
        hpke_kem=kem,
    )
    try:
        async with serve_nodes(net.nodes, socks, base):
            holder, reader = (net.nodes[institution_id(n)] for n in _NAMES)
            patient = generate_patients(1, seed=7, resources_per_patient=resources)[0]
            stored = []
            for resource in patient.all_resources():
                written, _ = await holder.records.update(
                    resource["resourceType"], resource["id"], resource
                )
                stored.append(f"{written.resource_type}/{written.id}")
            wallet = PatientWallet.create(base / "patient.wallet", b"bench patient")
            assert holder.sharing is not None and holder.consortium is not None
            await holder.sharing.enroll(
                patient.patient_id,
                wallet.public,
                wallet.enrollment_signature(holder.config.institution, patient.patient_id),
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
            yield _Net(
                net=net, holder=holder, reader=reader, consent=tx.hash().hex(), records=stored
            )
    finally:
        await net.close()


async def _fetches(n: _Net, count: int, concurrency: int, offset: int = 0) -> dict[str, Any]:
    """``count`` verified fetches, ``concurrency`` in flight; throughput and latency."""
    assert n.reader.sharing is not None
    sharing = n.reader.sharing
    holder = n.holder.config.institution
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

    elapsed, cpu = await gather_timed(client() for _ in range(concurrency))
    return {
        "concurrency": concurrency,
        "fetches": len(lat),
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "fetches_per_s": round(len(lat) / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_ms": percentiles(lat),
        "cpu_ms_per_fetch": round(cpu * 1000 / max(len(lat), 1), 3),
    }


def _access_entries(node: Node) -> int:
    """``access`` transactions on ``node``'s private chain (counted from its blocks)."""
    from medledger.core.models import Transaction

    return sum(
        Transaction.decode(data).type == "access"
        for block in node.store.iter_blocks(1)
        for data in block.tx_data
    )


async def _run_kem(base: Path, kem: str, settings: SharingSettings, console: Console) -> Any:
    async with _sharing_network(base, kem, settings.resources) as n:
        warm = await _fetches(n, settings.warmup, 1)
        if warm["errors"]:
            raise RuntimeError(f"{kem}: warm-up fetch failed: {warm['first_error']}")
        done = settings.warmup
        single = await _fetches(n, settings.latency_fetches, 1, done)
        done += settings.latency_fetches
        console.log(
            f"{kem}: concurrency 1 → p50 {single['latency_ms']['p50']} ms, "
            f"p99 {single['latency_ms']['p99']} ms, {single['fetches_per_s']}/s"
        )
        loaded = []
        for c in settings.concurrency:
            run = await _fetches(n, settings.throughput_fetches, c, done)
            done += settings.throughput_fetches
            loaded.append(run)
            console.log(
                f"{kem}: concurrency {c} → {run['fetches_per_s']}/s, "
                f"p50 {run['latency_ms']['p50']} ms, p99 {run['latency_ms']['p99']} ms"
            )
        t = time.perf_counter()
        await n.holder.access.drain()
        drain_s = time.perf_counter() - t
        assert n.holder.consortium is not None
        summaries = sum(1 for _ in _consortium_access(n.holder))
        return {
            "kem": kem,
            "wrapped_for": (n.reader.config.hpke_key or "").partition(":")[0],
            "single": single,
            "loaded": loaded,
            "fetches_total": done,
            "summaries_drain_after_last_fetch_s": round(drain_s, 3),
            "holder_access_entries": _access_entries(n.holder),
            "reader_access_entries": _access_entries(n.reader),
            "consortium_access_summaries_final": summaries,
        }


def _consortium_access(node: Node) -> Any:
    from medledger.core.models import Transaction

    store = node.consortium_store
    assert store is not None
    for block in store.iter_blocks(1):
        for data in block.tx_data:
            if Transaction.decode(data).type == "access":
                yield data


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
    for col in ("KEM", "concurrency", "fetches/s", "p50 / p95 / p99 ms", "CPU ms/fetch", "errors"):
        t.add_column(col, justify="right")
    for run in results["runs"]:
        for r in (run["single"], *run["loaded"]):
            lat = r["latency_ms"]
            t.add_row(
                run["kem"],
                str(r["concurrency"]),
                f"{r['fetches_per_s']:,}",
                f"{lat['p50']} / {lat['p95']} / {lat['p99']}",
                str(r["cpu_ms_per_fetch"]),
                str(r["errors"]),
            )
    Console().print(t)
    for kem, h in results["hpke"].items():
        Console().print(
            f"HPKE {kem}: seal {h['seal_us']} µs + open {h['open_us']} µs "
            f"= {h['round_trips_per_s']:,} round trips/s"
        )
