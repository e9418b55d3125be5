"""Search latency over the blind index: chained, ``_include``, ``:contains`` and ``_sort``.

Loads a synthetic population (``--resources`` in all, 100 per patient, one
transaction Bundle per patient) into a fresh node, then times each kind of
query ``--repeat`` times with varying values, through the records service
(index look-ups, decryption of what is shown, the same code the API runs),
and prints p50 / p99 / max in milliseconds as JSON. Not part of the suite:
100,000 resources take many minutes to load. Run:
``python bench/search_queries.py --resources 100000`` (``--resources 2000``
for a quick look). ``--dir D`` keeps the node; ``--dir D --reuse`` queries it
again without loading (e.g. with another build on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from medledger.node import Node, init_node, open_node
from medledger.storage.keystore import KdfParams
from medledger.synthetic import generate_patients

PW = b"search bench passphrase"
PER_PATIENT = 100


def _bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for r in resources
        ],
    }


async def _load(node: Node, patients: int, seed: int) -> list[dict[str, Any]]:
    started, done = time.perf_counter(), 0
    people = []
    for start in range(0, patients, 50):
        batch = generate_patients(
            min(50, patients - start),
            seed=seed,
            start_index=start,
            resources_per_patient=PER_PATIENT,
        )
        for bundle in batch:
            resources = list(bundle.all_resources())
            await node.records.transaction(_bundle(resources))
            done += len(resources)
            people.append(bundle.patient)
        rate = done / (time.perf_counter() - started)
        print(f"loaded {done} resources ({rate:.0f}/s)", flush=True)
    return people


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(p99 * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
        "n": len(ordered),
    }


async def _time(queries: list[Callable[[], Awaitable[int]]]) -> tuple[list[float], int]:
    samples, found = [], 0
    for query in queries:
        t = time.perf_counter()
        found += await query()
        samples.append(time.perf_counter() - t)
    return samples, found


def _generated(patients: int, seed: int) -> list[dict[str, Any]]:
    """The patients :func:`_load` stored with the same arguments (generation is seeded)."""
    people = []
    for start in range(0, patients, 50):
        batch = generate_patients(
            min(50, patients - start),
            seed=seed,
            start_index=start,
            resources_per_patient=PER_PATIENT,
        )
        people.extend(bundle.patient for bundle in batch)
    return people


async def _run(root: Path, resources: int, repeat: int, seed: int, load: bool) -> dict[str, Any]:
    node = open_node(root, PW)
    try:
        t = time.perf_counter()
        patients = max(1, resources // (PER_PATIENT + 1))
        people = await _load(node, patients, seed) if load else _generated(patients, seed)
        load_s = time.perf_counter() - t
        rng = random.Random(seed)
        chosen = [rng.choice(people) for _ in range(repeat)]
        records = node.records

        def chained(p: dict[str, Any]) -> Callable[[], Awaitable[int]]:
            family = p["name"][0]["family"]
            birth = p["birthDate"]
            params = {"subject:Patient.family": [family], "subject:Patient.birthdate": [birth]}

            async def go() -> int:
                total, _ = await records.search_page("Encounter", params, 0, 50)
                return total

            return go

        def include(p: dict[str, Any]) -> Callable[[], Awaitable[int]]:
            async def go() -> int:
                _, page = await records.search_page("Encounter", {"patient": [p["id"]]}, 0, 50)
                extra = await records.included(page, [("Encounter:subject", False)], [])
                return len(page) + len(extra)

            return go

        def contains(p: dict[str, Any]) -> Callable[[], Awaitable[int]]:
            family = p["name"][0]["family"]
            start = rng.randint(0, max(0, len(family) - 4))
            needle = family[start : start + 4]

            async def go() -> int:
                total, _ = await records.search_page("Patient", {"name:contains": [needle]}, 0, 50)
                return total

            return go

        def sort(p: dict[str, Any]) -> Callable[[], Awaitable[int]]:
            async def go() -> int:
                total, _ = await records.search_page(
                    "Observation", {"patient": [p["id"]]}, 0, 50, sort=["-date"]
                )
                return total

            return go

        results: dict[str, Any] = {}
        for name, make in (
            ("chained subject:Patient.family & .birthdate", chained),
            ("_include Encounter:subject (patient's encounters)", include),
            (":contains name (4 characters)", contains),
            ("_sort -date (a patient's ~80 Observations)", sort),
        ):
            samples, found = await _time([make(p) for p in chosen])
            results[name] = {**_percentiles(samples), "matches_per_query": found / len(chosen)}
        return {
            "resources": len(people) * (PER_PATIENT + 1),
            **(
                {
                    "load_s": round(load_s, 1),
                    "load_per_s": round(len(people) * (PER_PATIENT + 1) / load_s, 1),
                }
                if load
                else {}
            ),
            "queries": results,
            "load_average": os.getloadavg(),
        }
    finally:
        await node.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--resources", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--dir", type=Path, default=None, help="keep the node here")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="query the node an earlier run kept in --dir (same --resources and --seed)"
        " instead of loading a new one: compares two builds on the same data",
    )
    args = parser.parse_args()
    if args.reuse and args.dir is None:
        parser.error("--reuse needs --dir")
    with tempfile.TemporaryDirectory(prefix="search-bench-") as tmp:
        root = (args.dir or Path(tmp)) / "node"
        if not args.reuse:
            init_node(root, name="Search Bench", passphrase=PW, kdf=KdfParams(n=2**12))
        result = asyncio.run(_run(root, args.resources, args.repeat, args.seed, not args.reuse))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
