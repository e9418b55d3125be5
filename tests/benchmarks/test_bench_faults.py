"""``medledger bench faults`` at smoke-test sizes (from the shared ``bench all --quick``).

Checked for shape and for what must hold whatever the machine — no
acknowledged write lost, the chain verifies, every restart got ready, a hung
nats-server only stalls — never for timing thresholds (those are figures in
docs/benchmarks.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from medledger.benchmarks.report import render_area


def _latency_ok(value: dict[str, Any]) -> None:
    assert set(value) == {"p50", "p95", "p99", "max"}
    assert 0 < value["p50"] <= value["p95"] <= value["p99"] <= value["max"]


@pytest.mark.slow
def test_quick_faults_lose_no_acknowledged_write(quick_all: Path) -> None:
    results: dict[str, Any] = json.loads((quick_all / "results" / "faults.json").read_text())
    assert results["quick"] is True
    settings, kills = results["settings"], results["kills"]
    assert kills["kills"] == settings["kills"] >= 1
    # Every round reached its acknowledged writes, then one more after the last restart.
    assert kills["acknowledged"] >= settings["writes_per_round"] * (settings["kills"] + 1)
    assert kills["lost"] == 0
    assert kills["chain_verified"] is True
    _latency_ok(kills["restart_to_ready_ms"])
    _latency_ok(kills["kill_to_ready_ms"])
    assert kills["kill_to_ready_ms"]["max"] >= kills["restart_to_ready_ms"]["max"]
    nats = results["nats"]
    assert len(nats["rounds"]) == settings["nats_rounds"] >= 1
    for rnd in nats["rounds"]:
        assert rnd["hung_server"] in range(nats["members"])
        assert rnd["stall_ms_at_its_member"] > 0 and rnd["stall_ms_at_other_members"] > 0
        assert rnd["final_ms_after_resume"] > 0
    assert nats["worst_stall_ms"] >= max(r["stall_ms_at_its_member"] for r in nats["rounds"])
    assert "medledger bench faults" in render_area("faults", results)
