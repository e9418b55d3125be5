"""``medledger bench hybrid`` and its consortium-only mode, at smoke-test sizes.

Results are checked for shape and internal consistency only — never for
timing thresholds (those live in docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from cli_support import medledger_command
from medledger.benchmarks.hybrid import (
    BenchNetwork,
    HybridSettings,
    offer,
    schedule,
    workload,
)
from medledger.benchmarks.hybrid_summary import compare
from medledger.benchmarks.report import LATEST_HEADING, plot_hybrid, update_markdown
from medledger.cli.consortium import verify_consortium_store
from medledger.core.consortium import CONSORTIUM_ONLY, HYBRID
from medledger.core.models import Transaction
from medledger.synthetic import generate_patient

PNG = b"\x89PNG\r\n\x1a\n"


def _latency_ok(value: dict[str, Any]) -> None:
    assert set(value) == {"p50", "p95", "p99", "max"}
    assert 0 <= value["p50"] <= value["p95"] <= value["p99"] <= value["max"]


@pytest.fixture(scope="module")
def quick_run(quick_all: Path) -> tuple[Path, dict[str, Any]]:
    return quick_all, json.loads((quick_all / "results" / "hybrid.json").read_text())


@pytest.mark.slow
def test_bench_all_runs_every_registered_benchmark(quick_all: Path) -> None:
    from medledger.cli.bench import bench

    expected = set(bench.commands) - {"all"}
    assert {"private", "records", "consortium", "hybrid"} <= expected
    produced = {p.stem for p in (quick_all / "results").glob("*.json")}
    assert produced == expected
    text = (quick_all / "benchmarks.md").read_text()
    for name in expected:
        assert text.count(f"<!-- bench:{name}:begin -->") == 1
        results = json.loads((quick_all / "results" / f"{name}.json").read_text())
        assert results["machine"]["cores"] >= 1


@pytest.mark.slow
def test_quick_run_measures_both_modes_at_every_load(
    quick_run: tuple[Path, dict[str, Any]],
) -> None:
    _, results = quick_run
    assert results["quick"] is True
    assert {"cpu", "cores", "python", "date"} <= set(results["machine"])
    assert "medledger" in results["versions"]
    runs = results["runs"]
    assert [(r["mode"], r["ordering"]) for r in runs] == [
        (HYBRID, "jetstream"),
        (CONSORTIUM_ONLY, "jetstream"),
        (HYBRID, "solo"),
        (CONSORTIUM_ONLY, "solo"),
    ]
    loads = results["settings"]["loads"]
    assert results["settings"]["layout"] == "one process per institution"
    for run in runs:
        assert run["institutions"] == 4
        assert run["steps"], run
        assert [s["offered_per_s"] for s in run["steps"]] == loads[: len(run["steps"])]
        for step in run["steps"]:
            assert step["errors"] == 0
            assert step["records"] >= 1
            # Every offered record was written once, by exactly one institution's process.
            assert step["acked"] == step["records"]
            assert step["achieved_per_s"] > 0
            _latency_ok(step["validation_ms"])
            _latency_ok(step["tamper_evidence_ms"])
            assert step["all_tamper_evident"] is True
            assert step["cpu_ms_per_record"] >= step["cpu_ms_per_record_net"] >= 0
            for key in ("validation", "tamper"):
                cdf = step["cdf_ms"][key]
                assert len(cdf) == 101 and cdf == sorted(cdf)
        assert run["saturation_per_s"] == max(s["achieved_per_s"] for s in run["steps"])


def test_consortium_only_tamper_evidence_is_its_validation(
    quick_run: tuple[Path, dict[str, Any]],
) -> None:
    """Its final block is both; hybrid waits for the anchor after the private commit."""
    _, results = quick_run
    only = next(r for r in results["runs"] if r["mode"] == CONSORTIUM_ONLY)
    for step in only["steps"]:
        assert step["tamper_evidence_ms"] == step["validation_ms"]
    hybrid = next(r for r in results["runs"] if r["mode"] == HYBRID)
    for step in hybrid["steps"]:
        assert step["tamper_evidence_ms"]["p50"] >= step["validation_ms"]["p50"]


def test_comparison_is_computed_from_the_same_run(
    quick_run: tuple[Path, dict[str, Any]],
) -> None:
    _, results = quick_run
    assert results["comparison"] == compare(results["runs"])
    assert [c["ordering"] for c in results["comparison"]] == ["jetstream", "solo"]
    runs = {(r["mode"], r["ordering"]): r for r in results["runs"]}
    for c in results["comparison"]:
        hybrid, only = runs[(HYBRID, c["ordering"])], runs[(CONSORTIUM_ONLY, c["ordering"])]
        for row, h, o in zip(c["loads"], hybrid["steps"], only["steps"], strict=False):
            assert row["offered_per_s"] == h["offered_per_s"] == o["offered_per_s"]
            assert row["validation_p50_ratio"] == round(
                o["validation_ms"]["p50"] / h["validation_ms"]["p50"], 2
            )
        assert c["saturation_ratio"] == round(
            hybrid["saturation_per_s"] / only["saturation_per_s"], 2
        )


def test_plots_and_markdown_summary_are_written(
    quick_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, results = quick_run
    plots = plot_hybrid(results, tmp_path / "plots")  # drawn from the JSON alone
    assert {p.name for p in plots} == {"hybrid-latency-vs-load.png", "hybrid-cdf.png"}
    for p in plots:
        assert p.read_bytes()[:8] == PNG
    text = (out / "benchmarks.md").read_text()
    assert text.startswith("# Benchmarks\n\nHand-written analysis stays.\n")
    assert LATEST_HEADING in text
    assert text.count("<!-- bench:hybrid:begin -->") == 1
    assert "consortium-only" in text and "p50 / p95 / p99" in text
    # A second summary replaces the blocks instead of adding more.
    update_markdown(out / "benchmarks.md", {"hybrid": results, "private": {"txs": 5}})
    again = (out / "benchmarks.md").read_text()
    assert again.count("<!-- bench:hybrid:begin -->") == 1
    assert again.count("<!-- bench:private:begin -->") == 1
    assert "| txs | 5 |" in again
    assert "Hand-written analysis stays." in again


def test_consortium_only_records_read_back_and_an_auditor_verifies(tmp_path: Path) -> None:
    """Records committed on the consortium: readable, final at every member, re-verifiable."""
    bundle = generate_patient(0, seed=3, resources_per_patient=5)
    resources = [bundle.patient, *bundle.resources]

    async def scenario() -> list[Path]:
        bench = await BenchNetwork.open(tmp_path / "net", CONSORTIUM_ONLY, "solo", 2)
        try:
            service = bench.services[0]
            for res in resources:
                stored, created = await service.update(res["resourceType"], res["id"], res)
                assert created
            node = bench.nodes[0]
            assert node.consortium is not None and node.consortium_store is not None
            for res in resources:
                stored = await service.read(res["resourceType"], res["id"])
                assert json.loads(stored.data)["id"] == res["id"]
                _, data = node.consortium_store.tx_by_hash(stored.tx_hash)
                tx = Transaction.decode(data)
                assert tx.type == "record.put" and tx.chain == node.consortium.chain_id
                assert tx.signatures[0].signer == node.keystore.signing_key().fingerprint
            # Nothing went to the private chain: it holds only its genesis block.
            assert node.chain.head.height == 0
            other = bench.nodes[1]
            assert other.consortium is not None
            await other.consortium.wait_final(node.consortium.final_height, timeout=10)
            return [n.paths.root for n in bench.nodes]
        finally:
            await bench.close()

    roots = asyncio.run(scenario())
    for root in roots:
        report, _policy = verify_consortium_store(root)
        assert report.log_size == 1 + len(resources)
        proc = subprocess.run(
            [*medledger_command(), "verify", "--dir", str(root), "--consortium"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr


def test_each_institution_process_schedules_exactly_its_share() -> None:
    """Workers walk the same workload; together they offer what one process would."""
    settings = HybridSettings(institutions=3, per_patient=4)
    whole = schedule(workload(settings), 200, 150, 3)
    for i in range(3):
        mine = schedule(workload(settings), 200, 150, 3, only=i)
        assert len(mine) == 1
        assert [(t, r["id"]) for t, r in mine[0]] == [(t, r["id"]) for t, r in whole[i]]
    assert sum(len(q) for q in whole) == 150
    offsets = sorted(t for q in whole for t, _ in q)
    assert offsets == [k / 200 for k in range(150)]


def test_the_one_process_layout_still_runs(tmp_path: Path) -> None:
    out = tmp_path / "hybrid.json"
    proc = subprocess.run(
        [
            *medledger_command(),
            "bench",
            "hybrid",
            "--quick",
            "--one-process",
            "--ordering",
            "solo",
            "--load",
            "50",
            "--json-out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["settings"]["layout"] == "one process"
    assert [(r["mode"], r["ordering"]) for r in results["runs"]] == [
        (HYBRID, "solo"),
        (CONSORTIUM_ONLY, "solo"),
    ]
    for run in results["runs"]:
        (step,) = run["steps"]
        assert step["offered_per_s"] == 50
        assert step["acked"] == step["records"] and step["errors"] == 0


def test_a_record_is_timed_from_its_issue_or_when_it_was_due_whichever_came_first() -> None:
    """The loop's millisecond timer rounding is not counted; a busy loop's lateness is."""
    issued: list[tuple[float, float, float]] = []  # (offset, issued, called)

    class Recorder:
        async def write(self, i: int, resource: dict[str, Any], at: float, step: Any) -> None:
            issued.append((resource["offset"], at, time.perf_counter()))
            if resource["offset"] == 0.02:
                time.sleep(0.015)  # the loop busy: the next record starts late

    queues = deque((k / 100, {"offset": k / 100}) for k in range(6))

    async def go() -> float:
        start = time.perf_counter() + 0.02
        await offer(Recorder(), [queues], start, 1, None, lambda: None)  # type: ignore[arg-type]
        return start

    start = asyncio.run(go())
    assert [o for o, _, _ in issued] == [k / 100 for k in range(6)]
    for offset, at, called in issued:
        due = start + offset
        assert at <= due  # never timed from after it was due
        # From its issue, or from when it was due if the loop was busy until after.
        assert at == pytest.approx(min(due, called), abs=0.002)
        assert called >= due - 0.003  # woken at most about the loop's resolution early
    # Issued ahead of the loop's timer rounding and timed from the issue (the old timing,
    # from when it was due, counted the rounding: up to 1 ms).
    assert any(at < start + offset - 0.0005 for offset, at, _ in issued)
    _, late_at, late_called = issued[3]  # due at 0.03, the loop held until 0.035
    assert late_called > start + 0.03
    assert late_at == start + 0.03  # timed from when it was due: the wait counts
