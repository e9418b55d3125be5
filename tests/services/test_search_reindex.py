"""Re-index: a store whose tokens were made with older search terms answers the new ones after it.

The old store is simulated by replacing every resource's tokens with those of
its terms minus what this release added (numbers as cells, ``:contains``
pieces) and forgetting the recorded terms version, as an index written by the
previous release looks. The expected answers are computed from the input.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cli_support import medledger_command
from medledger.lifecycle import run_node
from medledger.node import Node, init_node, open_node
from medledger.services.search import TERMS_VERSION, _token, resource_terms
from medledger.services.search_registry import registry
from medledger.services.search_terms import MARK
from medledger.storage.keystore import KdfParams
from medledger.storage.ports import REINDEX_CURSOR_KEY, TERMS_VERSION_KEY
from medledger.synthetic import generate_patient

T = TypeVar("T")
PW = b"reindex test passphrase"
UCUM = "http://unitsofmeasure.org"
FAMILIES = ["Lindqvist", "Okafor", "Nakamura", "Smythe", "Oakes", "Garcia"]


def weight(n: int) -> dict[str, Any]:
    return {
        "resourceType": "Observation", "id": f"w{n}", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
        "subject": {"reference": f"Patient/p{n}"},
        "valueQuantity": {"value": 50 + 7 * n, "unit": "kg", "system": UCUM, "code": "kg"},
    }  # fmt: skip


def patient(n: int) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": f"p{n}", "name": [{"family": FAMILIES[n]}]}


DATA = [r for n in range(len(FAMILIES)) for r in (patient(n), weight(n))]
#: (type, query, expected ids), computed from DATA.
QUERIES: list[tuple[str, dict[str, list[str]], set[str]]] = [
    ("Observation", {"value-quantity": ["gt70"]},
     {r["id"] for r in DATA if r["resourceType"] == "Observation" and r["valueQuantity"]["value"] > 70}),
    ("Observation", {"value-quantity": [f"le64|{UCUM}|kg"]},
     {r["id"] for r in DATA if r["resourceType"] == "Observation" and r["valueQuantity"]["value"] <= 64}),
    ("Patient", {"family:contains": ["aka"]},
     {r["id"] for r in DATA if r["resourceType"] == "Patient" and "aka" in r["name"][0]["family"].lower()}),
]  # fmt: skip


def run(root: Path, fn: Callable[[Node], Awaitable[T]]) -> T:
    async def go() -> T:
        node = open_node(root, PW)
        try:
            return await fn(node)
        finally:
            await node.close()

    return asyncio.run(go())


def old_terms(resource: dict[str, Any]) -> set[tuple[str, str]]:
    """The terms minus what TERMS_VERSIONs 2 to 4 added: number cells, :contains pieces,
    uri segments (:below), composites and quantity units."""
    params = registry().parameters(resource["resourceType"])
    return {
        (p, t)
        for p, t in resource_terms(resource, limit=None)
        if not t.startswith((f"{MARK}c", f"{MARK}C", f"{MARK}b", f"{MARK}u"))
        and (params[p].type not in ("number", "quantity", "composite") or t == f"{MARK}?")
    }


async def make_old(node: Node) -> None:
    """Every resource's tokens as the previous release made them; no terms version."""
    key = node.records.reader._keys.search_key
    for r in DATA:
        stored = await node.records.read(r["resourceType"], r["id"])
        terms = old_terms(stored.resource())
        tokens = {_token(key, r["resourceType"], p, t) for p, t in terms}
        await node.index.set_tokens(r["resourceType"], r["id"], tokens)
    await node.index.set_meta(TERMS_VERSION_KEY, None)


async def answers(node: Node) -> list[set[str]]:
    return [set(await node.records.search_ids(t, q)) for t, q, _ in QUERIES]


@pytest.fixture
def old_store(tmp_path: Path) -> Path:
    root = tmp_path / "node"
    init_node(root, name="Reindex", passphrase=PW, kdf=KdfParams(n=2**12))

    async def fill(node: Node) -> list[set[str]]:
        for r in DATA:
            await node.records.update(r["resourceType"], r["id"], r)
        fresh = await answers(node)
        await make_old(node)
        return fresh

    fresh = run(root, fill)
    assert fresh == [expected for *_, expected in QUERIES]  # a current store answers
    return root


def test_an_old_store_misses_new_searches_until_reindexed(old_store: Path) -> None:
    async def go(node: Node) -> tuple[list[set[str]], list[set[str]], Any, bool, bool]:
        before = await answers(node)
        needed = node.records.reindexer.needed()
        report = await node.records.reindex()
        return before, await answers(node), report, needed, node.records.reindexer.needed()

    before, after, report, needed, still = run(old_store, go)
    expected = [e for *_, e in QUERIES]
    assert all(not b for b, e in zip(before, expected, strict=True) if e)  # stale: nothing
    assert needed and not still
    assert after == expected
    assert (report.reindexed, report.damaged, report.terms_version) == (len(DATA), 0, TERMS_VERSION)
    # Recorded durably: the next open needs nothing.
    assert run(old_store, lambda n: asyncio.sleep(0, n.records.reindexer.status())) == "current"


def test_a_stopped_reindex_resumes_after_its_cursor(old_store: Path) -> None:
    """Resources up to the cursor count as done: a resumed run does only the rest."""
    keys = sorted((r["resourceType"], r["id"]) for r in DATA)
    cursor = keys[len(keys) // 2 - 1]

    async def go(node: Node) -> tuple[Any, list[set[str]], str | None]:
        await node.index.set_meta(REINDEX_CURSOR_KEY, f"{cursor[0]}/{cursor[1]}")
        report = await node.records.reindex()
        return report, await answers(node), node.index.meta(REINDEX_CURSOR_KEY)

    report, after, left = run(old_store, go)
    assert report.total == report.reindexed == len(keys) - len(keys) // 2
    assert left is None and report.terms_version == TERMS_VERSION
    done_after = {k[1] for k in keys if k > cursor}
    for (_, _, expected), got in zip(QUERIES, after, strict=True):
        assert got == expected & done_after  # those before the cursor were never redone


def test_a_starting_node_reindexes_in_the_background(old_store: Path) -> None:
    async def go() -> tuple[list[str], list[set[str]]]:
        seen = []
        async with run_node(old_store, PW) as runtime:
            reindexer = runtime.node.records.reindexer
            deadline = time.monotonic() + 60
            while (status := reindexer.status()) != "current":
                seen.append(status)
                assert time.monotonic() < deadline, "the re-index did not finish"
                assert runtime.node.health.problems() == {}
                await asyncio.sleep(0.01)
            return seen, await answers(runtime.node)

    seen, after = asyncio.run(go())
    assert after == [e for *_, e in QUERIES]
    assert all(s == "outdated" or s.startswith("reindexing ") for s in seen)


def test_the_cli_reindexes_a_stopped_node(old_store: Path) -> None:
    done = subprocess.run(
        [*medledger_command(), "record", "reindex", "--dir", str(old_store)],
        env={**os.environ, "MEDLEDGER_PASSPHRASE": PW.decode()},
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "reindexed": len(DATA),
        "damaged": 0,
        "terms_version": TERMS_VERSION,
    }
    assert run(old_store, answers) == [e for *_, e in QUERIES]


#: SHA-256 of the terms of a fixed sample, per TERMS_VERSION. A change of any term
#: must bump TERMS_VERSION (stores re-index) and add its digest here.
TERMS_DIGESTS = {4: "c882884d168d9f7114763a1c1d558c96f12f64f80fe80778806af00fe3f8fbb1"}


def test_changed_terms_bump_the_terms_version() -> None:
    sample = [*DATA, *generate_patient(3, seed=18, resources_per_patient=60).all_resources()]
    text = json.dumps(sorted(sorted(resource_terms(r, limit=None)) for r in sample))
    assert hashlib.sha256(text.encode()).hexdigest() == TERMS_DIGESTS[TERMS_VERSION]
