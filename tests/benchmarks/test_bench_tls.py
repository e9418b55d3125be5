"""``medledger bench tls`` at the smoke-test size (from the shared ``bench all --quick`` run).

Shape and consistency only: both transports measured in the same run, every
figure present and positive. Timing comparisons live in docs/benchmarks.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medledger.benchmarks.report import render_area


def _latency_ok(value: dict[str, Any]) -> None:
    assert set(value) == {"p50", "p95", "p99", "max"}
    assert 0 < value["p50"] <= value["p95"] <= value["p99"] <= value["max"]


def test_tls_and_plaintext_are_measured_in_one_run(quick_all: Path) -> None:
    results = json.loads((quick_all / "results" / "tls.json").read_text())
    assert results["quick"] is True
    settings = results["settings"]
    for transport in ("tls", "plaintext"):
        api = results["api"][transport]
        assert api["keep_alive"]["requests"] == settings["requests"]
        assert api["keep_alive"]["per_s"] > 0
        _latency_ok(api["keep_alive"]["latency_ms"])
        assert api["new_connection"]["requests"] == settings["connections"]
        _latency_ok(api["new_connection"]["latency_ms"])
        fetch = results["sharing"][transport]
        assert fetch["fetches"] == settings["fetches"] and fetch["errors"] == 0
        assert fetch["fetches_per_s"] > 0
        _latency_ok(fetch["latency_ms"])
        js = results["jetstream"][transport]
        assert js["publishes"] == settings["publishes"]
        assert js["concurrent_per_s"] > 0
        _latency_ok(js["sequential_latency_ms"])
    assert "medledger bench tls" in render_area("tls", results)
