"""``bench hybrid``'s comparison of the two modes, and its summary on the terminal.

Every ratio comes from runs of one invocation: hybrid and consortium-only
with the same ordering, at the offered loads both measured.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from medledger.core.consortium import CONSORTIUM_ONLY, HYBRID

__all__ = ["compare", "print_summary"]


def compare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Hybrid vs consortium-only, per ordering, from runs of one invocation."""
    out = []
    by = {(r["mode"], r["ordering"]): r for r in runs}
    for ordering in dict.fromkeys(r["ordering"] for r in runs):
        hybrid, only = by.get((HYBRID, ordering)), by.get((CONSORTIUM_ONLY, ordering))
        if hybrid is None or only is None:
            continue
        h_steps = {s["offered_per_s"]: s for s in hybrid["steps"]}
        loads = []
        for s in only["steps"]:
            h = h_steps.get(s["offered_per_s"])
            if h is None:
                continue
            loads.append(
                {
                    "offered_per_s": s["offered_per_s"],
                    "validation_p50_ratio": _ratio(
                        s["validation_ms"]["p50"], h["validation_ms"]["p50"]
                    ),
                    "validation_p99_ratio": _ratio(
                        s["validation_ms"]["p99"], h["validation_ms"]["p99"]
                    ),
                    "hybrid_tamper_p99_ms": h["tamper_evidence_ms"]["p99"],
                    "consortium_only_saturated": s["saturated"],
                    "hybrid_saturated": h["saturated"],
                }
            )
        out.append(
            {
                "ordering": ordering,
                "loads": loads,
                "saturation_ratio": _ratio(hybrid["saturation_per_s"], only["saturation_per_s"]),
                "hybrid_saturation_per_s": hybrid["saturation_per_s"],
                "consortium_only_saturation_per_s": only["saturation_per_s"],
                "hybrid_reached_saturation": hybrid["saturated"],
                "cpu_per_record_ratio": _ratio(_cpu_at_top(only), _cpu_at_top(hybrid)),
            }
        )
    return out


def _cpu_at_top(run: dict[str, Any]) -> float:
    """Net CPU per record at the highest load run (closest to saturation)."""
    return float(run["steps"][-1]["cpu_ms_per_record_net"]) if run["steps"] else 0.0


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b > 0 else None


def print_summary(results: dict[str, Any]) -> None:
    t = Table(title="medledger bench hybrid (validation = submit → durable commit)")
    for col in (
        "ordering",
        "mode",
        "offered/s",
        "achieved/s",
        "validation p50/p99 ms",
        "tamper-evident p50/p99 ms",
        "CPU ms/record",
    ):
        t.add_column(col, justify="right")
    for run in results["runs"]:
        for s in run["steps"]:
            t.add_row(
                run["ordering"],
                run["mode"],
                f"{s['offered_per_s']:,}",
                f"{s['achieved_per_s']:,.0f}" + (" (sat.)" if s["saturated"] else ""),
                f"{s['validation_ms']['p50']} / {s['validation_ms']['p99']}",
                f"{s['tamper_evidence_ms']['p50']} / {s['tamper_evidence_ms']['p99']}",
                f"{s['cpu_ms_per_record']} ({s['cpu_ms_per_record_net']} net)",
            )
    Console().print(t)
    for c in results["comparison"]:
        Console().print(
            f"{c['ordering']}: saturation hybrid {c['hybrid_saturation_per_s']:,.0f}/s vs "
            f"consortium-only {c['consortium_only_saturation_per_s']:,.0f}/s "
            f"({c['saturation_ratio']}x); validation p50 ratio by load: "
            + ", ".join(f"{x['offered_per_s']}/s {x['validation_p50_ratio']}x" for x in c["loads"])
        )
