"""``medledger bench workers`` at smoke-test size, from the shared ``bench all --quick`` run.

Shape and internal consistency only, never timing thresholds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medledger.benchmarks.report import render_area


def test_workers_measures_1_and_2_workers_closed_and_open_loop(quick_all: Path) -> None:
    results: dict[str, Any] = json.loads((quick_all / "results" / "workers.json").read_text())
    assert results["quick"] is True
    assert "medledger bench workers" in render_area("workers", results)
    assert [run["workers"] for run in results["runs"]] == [1, 2]
    for run in results["runs"]:
        assert len(run["load_before"]) == 3 and len(run["load_after"]) == 3
        for op in ("reads", "creates"):
            saturated = run[op]
            assert saturated["errors"] == 0, saturated["first_error"]
            assert saturated["per_s"] > 0 and saturated["server_cpu_ms_per_request"] > 0
            points = run["open_loop"][op]
            assert [p["fraction"] for p in points] == [0.5, 0.8]
            for point in points:
                assert point["errors"] == 0
                assert point["rate_per_s"] <= saturated["per_s"]
                lat = point["latency_ms"]
                assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    scaling = results["scaling"]["2_over_1"]
    for op in ("reads", "creates"):
        one, two = results["runs"][0][op], results["runs"][1][op]
        assert scaling[op]["throughput"] == round(two["per_s"] / one["per_s"], 2)
