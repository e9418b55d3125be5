"""``medledger bench records``: encrypted FHIR writes, reads and blind-index search.

In-process, with encryption and durable chain commits on. Writes synthetic
patients (``synthetic``) with concurrent writers, then measures
concurrent reads and search latency over everything written, and the cost of
each write stage measured alone on the same resources (validation,
encryption, chain commit, blob + index storage) so the slowest is visible.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from medledger.benchmarks.common import (
    BENCH_KDF,
    BENCH_PASSPHRASE,
    machine,
    percentiles,
    write_json,
)
from medledger.core.envelope import RecordContext, seal_record
from medledger.node import Node, init_node, open_node
from medledger.services.bulk_export import BulkExports, ExportSpec
from medledger.services.fhir import dump_resource, validate_resource
from medledger.services.records.service import RecordsService
from medledger.synthetic import generate_patients

__all__ = ["run_records_bench"]


async def ingest(
    records: RecordsService, resources: Sequence[Mapping[str, Any]], writers: int
) -> None:
    """Store ``resources`` under their own ids (update-as-create) with ``writers`` concurrent writers.

    References between them stay valid because ids are kept.
    """
    todo = iter(resources)

    async def writer() -> None:
        for res in todo:
            await records.update(str(res["resourceType"]), str(res["id"]), res)

    await asyncio.gather(*(writer() for _ in range(writers)))


async def _read_all(
    node: Node, keys: list[tuple[str, str]], writers: int
) -> tuple[float, list[float]]:
    todo = iter(keys)
    lat: list[float] = []

    async def reader() -> None:
        for rtype, rid in todo:
            t = time.perf_counter()
            await node.records.read(rtype, rid)
            lat.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(reader() for _ in range(writers)))
    return time.perf_counter() - start, lat


def _stage_costs(items: list[dict[str, Any]]) -> dict[str, float]:
    """Microseconds per resource of the CPU stages, measured alone."""
    sample = items[:2000]
    t = time.perf_counter()
    for res in sample:
        validate_resource(res)
    validation = (time.perf_counter() - t) / len(sample)
    t = time.perf_counter()
    for res in sample:
        ctx = RecordContext(
            institution="bench", resource_type=res["resourceType"], id=res["id"], version=1
        )
        seal_record(os.urandom(32), os.urandom(12), dump_resource(res), ctx)
    encryption = (time.perf_counter() - t) / len(sample)
    return {
        "validation_us": round(validation * 1e6, 1),
        "serialize_encrypt_us": round(encryption * 1e6, 1),
    }


async def _search_latencies(node: Node, patient_ids: list[str], rounds: int) -> dict[str, Any]:
    rng = random.Random(4)  # noqa: S311 - reproducible sampling, not cryptography
    queries: list[tuple[str, dict[str, list[str]]]] = []
    for _ in range(rounds):
        pid = rng.choice(patient_ids)
        queries.append(("Observation", {"patient": [pid], "code": ["http://loinc.org|8867-4"]}))
        queries.append(("Condition", {"patient": [pid]}))
        queries.append(
            (
                "Patient",
                {
                    "family": [rng.choice(["smi", "joh", "gar", "bro", "lee"])],
                    "birthdate": ["ge1980-01-01"],
                },
            )
        )
    lat: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    for rtype, params in queries:
        t = time.perf_counter()
        found = await node.records.search(rtype, params)
        key = f"{rtype}?{'&'.join(params)}"
        lat.setdefault(key, []).append(time.perf_counter() - t)
        counts[key] = counts.get(key, 0) + len(found)
    return {
        k: {**percentiles(v), "mean_results": round(counts[k] / len(v), 1)} for k, v in lat.items()
    }


async def _bulk_export_rates(node: Node) -> dict[str, Any]:
    """Bulk Data export: resources/s of a system-level and a Patient-level export (select,
    decrypt, re-encrypt to the job's files, one ``access`` entry each), and of downloading
    (decrypting) the files, each measured alone on everything the run wrote."""
    exports = await node.start_exports(ttl_s=3600)
    out: dict[str, Any] = {}
    for level in ("system", "patient"):
        start = time.perf_counter()
        job = exports.submit(
            ExportSpec(level=level, request=f"bench {level}"), owner="bench", actor="admin:bench"
        )
        while not exports.job(job.id, "bench").complete:
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - start
        exported = sum(f.count for f in job.outputs)
        out[f"{level}_resources"] = exported
        out[f"{level}_resources_per_s"] = round(exported / elapsed)
        if level == "system":
            out["download_resources_per_s"] = round(exported / await _download_all(exports, job.id))
        else:
            await exports.cancel(job.id, "bench")
    return out


async def _download_all(exports: BulkExports, job_id: str) -> float:
    """Seconds to stream (decrypt) every file of the job."""
    job = exports.job(job_id, "bench")
    start = time.perf_counter()
    for f in job.outputs:
        async for _ in await exports.download(job_id, "bench", f.name):
            pass
    return time.perf_counter() - start


def run_records_bench(
    *,
    root: Path | None,
    patients: int,
    per_patient: int,
    writers: int,
    json_out: Path | None,
    quick: bool,
    workers: int = 0,
) -> dict[str, Any]:
    """Run the records benchmark; ``workers`` validation processes (0 = inline)."""
    console = Console(stderr=True)
    if quick:
        patients, per_patient = min(patients, 20), min(per_patient, 20)
    tmp = None
    if root is None:
        tmp = tempfile.mkdtemp(prefix="medledger-bench-records-")
        root = Path(tmp)
    path = root / "records-node"
    if path.exists():
        shutil.rmtree(path)
    root.mkdir(parents=True, exist_ok=True)
    bundles = generate_patients(patients, seed=7, resources_per_patient=per_patient)
    items: list[dict[str, Any]] = []
    for b in bundles:
        items.append(b.patient)
        items.extend(b.resources)
    patient_ids = [b.patient["id"] for b in bundles]
    results: dict[str, Any] = {
        "machine": machine(),
        "resources": len(items),
        "patients": patients,
        "writers": writers,
        "validation_workers": workers,
    }
    try:
        init_node(path, name="records bench", passphrase=BENCH_PASSPHRASE, kdf=BENCH_KDF)
        results["stages"] = _stage_costs(items)

        async def go() -> None:
            node = open_node(path, BENCH_PASSPHRASE, validation_workers=workers)
            try:
                console.print(f"[bold]creates[/]: {len(items):,} resources, {writers} writers")
                start = time.perf_counter()
                await ingest(node.records, items, writers)
                elapsed = time.perf_counter() - start
                results["creates_per_s"] = round(len(items) / elapsed)
                rng = random.Random(9)  # noqa: S311 - reproducible sampling, not cryptography
                keys = [
                    (r["resourceType"], r["id"]) for r in rng.sample(items, min(len(items), 20_000))
                ]
                console.print(f"[bold]reads[/]: {len(keys):,} random resources, {writers} readers")
                elapsed, lat = await _read_all(node, keys, writers)
                results["reads_per_s"] = round(len(keys) / elapsed)
                results["read_ms"] = percentiles(lat)
                console.print("[bold]search[/] latency")
                results["search_ms"] = await _search_latencies(
                    node, patient_ids, 100 if not quick else 10
                )
                console.print("[bold]bulk export[/]: system and Patient level, then download")
                results["bulk_export"] = await _bulk_export_rates(node)
            finally:
                await node.close()

        asyncio.run(go())
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    _print(results)
    if json_out is not None:
        write_json(json_out, results)
    return results


def _print(r: dict[str, Any]) -> None:
    t = Table(
        title=f"medledger bench records ({r['resources']:,} resources, {r['patients']:,} patients)"
    )
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_row(
        f"creates, {r['writers']} writers (validate+encrypt+blob+index+chain)",
        f"{r['creates_per_s']:,}/s",
    )
    t.add_row("reads (chain check + decrypt)", f"{r['reads_per_s']:,}/s")
    t.add_row("read latency p50 / p99", f"{r['read_ms']['p50']} / {r['read_ms']['p99']} ms")
    for q, v in r["search_ms"].items():
        t.add_row(f"search {q} p50 / p99", f"{v['p50']} / {v['p99']} ms ({v['mean_results']} hits)")
    b = r["bulk_export"]
    t.add_row(
        f"bulk export, system level ({b['system_resources']:,} resources)",
        f"{b['system_resources_per_s']:,}/s",
    )
    t.add_row(
        f"bulk export, Patient level ({b['patient_resources']:,} resources)",
        f"{b['patient_resources_per_s']:,}/s",
    )
    t.add_row("bulk export download (decrypt + stream)", f"{b['download_resources_per_s']:,}/s")
    s = r["stages"]
    t.add_row("stage: FHIR validation", f"{s['validation_us']} µs/resource")
    t.add_row("stage: serialize + AES-256-GCM", f"{s['serialize_encrypt_us']} µs/resource")
    Console().print(t)
