"""``medledger bench sharing`` and ``medledger bench api`` at smoke-test sizes.

Results are checked for shape and internal consistency only — never for
timing thresholds (those live in docs/benchmarks.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from medledger.benchmarks.report import render_area
from medledger.benchmarks.sharing import hpke_cost_us
from medledger.services.hpke import KEMS


def _latency_ok(value: dict[str, Any]) -> None:
    assert set(value) == {"p50", "p95", "p99", "max"}
    assert 0 < value["p50"] <= value["p95"] <= value["p99"] <= value["max"]


def _results(quick_all: Path, name: str) -> dict[str, Any]:
    """``name``'s results from the shared ``bench all --quick`` run, with the common checks."""
    results: dict[str, Any] = json.loads((quick_all / "results" / f"{name}.json").read_text())
    assert results["quick"] is True
    assert results["machine"]["cores"] >= 1
    assert "medledger" in results["versions"]
    assert results["load_average_before"] >= 0 and results["load_average_after"] >= 0
    assert f"medledger bench {name}" in render_area(name, results)
    return results


@pytest.fixture(scope="module")
def sharing(quick_all: Path) -> dict[str, Any]:
    return _results(quick_all, "sharing")


@pytest.fixture(scope="module")
def api(quick_all: Path) -> dict[str, Any]:
    return _results(quick_all, "api")


@pytest.mark.slow
def test_sharing_measures_both_kems_with_every_fetch_verified(sharing: dict[str, Any]) -> None:
    s = sharing["settings"]
    assert [r["kem"] for r in sharing["runs"]] == list(KEMS)
    for run in sharing["runs"]:
        assert run["wrapped_for"] == run["kem"]
        single = run["single"]
        assert single["concurrency"] == 1
        assert single["fetches"] == s["latency_fetches"] and single["errors"] == 0
        _latency_ok(single["latency_ms"])
        assert [r["concurrency"] for r in run["loaded"]] == s["concurrency"]
        for loaded in run["loaded"]:
            assert loaded["fetches"] == s["throughput_fetches"] and loaded["errors"] == 0
            assert loaded["fetches_per_s"] > 0
            _latency_ok(loaded["latency_ms"])
        total = s["warmup"] + s["latency_fetches"] + s["throughput_fetches"] * len(s["concurrency"])
        assert run["fetches_total"] == total
        # Every fetch left an access entry at both ends and a consortium summary.
        assert run["holder_access_entries"] >= total
        assert run["reader_access_entries"] >= total
        assert run["consortium_access_summaries_final"] == total
        assert 1 <= run["consortium_access_batches"] <= total
    assert set(sharing["hpke"]) == set(KEMS)
    assert set(sharing["comparison"]) == {
        "p50_extra_ms",
        "hpke_round_trip_extra_us",
        "throughput_ratio",
    }


@pytest.mark.slow
def test_api_measures_http_and_in_process_with_ratios(api: dict[str, Any]) -> None:
    s = api["settings"]
    for op, count in (("creates", s["creates"]), ("reads", s["reads"])):
        runs = api["http"][op]
        assert [r["client_processes"] for r in runs] == s["client_processes"]
        for run in runs:
            assert run["clients"] == s["clients"]
            assert run["requests"] == count and run["errors"] == 0
            assert run["per_s"] > 0 and run["server_cpu_ms_per_request"] > 0
            _latency_ok(run["latency_ms"])
    floor = api["http"]["healthz"]
    assert floor["requests"] >= 1 and floor["errors"] == 0
    _latency_ok(floor["latency_ms"])
    ip = api["in_process"]
    assert set(ip) == {"creates", "reads", "reads_with_access_entry"}
    assert ip["creates"]["requests"] == s["creates"]
    assert ip["reads"]["requests"] == ip["reads_with_access_entry"]["requests"] == s["reads"]
    for op in ("creates", "reads"):
        r = api["ratio"][op]
        best = max(x["per_s"] for x in api["http"][op])
        assert r["best_http_per_s"] == best
        assert r["in_process_over_http"] == round(ip[op]["per_s"] / best, 2)
    # Issue 19's CPU ratios, from the same run's figures.
    cpu = api["ratio"]["cpu"]
    read = min(x["server_cpu_ms_per_request"] for x in api["http"]["reads"])
    create = min(x["server_cpu_ms_per_request"] for x in api["http"]["creates"])
    assert cpu["read_over_empty"] == round(read / floor["server_cpu_ms_per_request"], 2)
    assert cpu["http_create_over_in_process"] == round(
        create / ip["creates"]["cpu_ms_per_request"], 2
    )
    assert "Server CPU per FHIR read" in render_area("api", api)


def test_hpke_cost_is_measured_for_each_kem() -> None:
    for kem in KEMS:
        cost = hpke_cost_us(kem, 5)
        assert cost["round_trip_us"] == pytest.approx(cost["seal_us"] + cost["open_us"], abs=0.2)
        assert cost["primitive_round_trips_per_s"] > 0
        assert cost["wrapped_key_bytes"] > 32
