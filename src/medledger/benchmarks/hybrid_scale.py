"""``bench hybrid --rtt … / --institutions 4,8,16 --cpu-per-institution …``: the claim at scale.

Issue #20. The loopback run of ``hybrid_run`` puts every institution on
one machine with no delay between them; this sweep runs the same
per-institution processes (``hybrid_procs``) with, for each requested
round trip, every cross-institution NATS link through a delaying relay
(``localnet.relay``; ``netem`` is preferred where the kernel has it, and
the results say which was used), and, for each consortium size, each
institution's processes in a cgroup with the same CPU quota
(``localnet.cgroups``). Hybrid and consortium-only run back to back at each
(round trip, size) point, so every ratio is from one invocation.

Only the ``jetstream`` ordering crosses a network; ``solo`` is a file on
this machine and is not part of the sweep.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from medledger.benchmarks.common import (
    finish_results,
    results_header,
    sweep_progress,
    work_dir,
    write_json,
)
from medledger.benchmarks.hybrid import HybridSettings
from medledger.benchmarks.hybrid_procs import run_per_institution
from medledger.benchmarks.hybrid_summary import compare
from medledger.core.consortium import CONSORTIUM_ONLY, HYBRID

__all__ = ["run_hybrid_scale", "scale_points"]

ORDERING = "jetstream"
#: The targets of issue #20, checked in :func:`targets`.
VALIDATION_RATIO_TARGET = 20.0
THROUGHPUT_RATIO_TARGET = 5.0
FLAT_WITHIN = 0.2
TAMPER_SLACK_MS = 100.0


def scale_points(
    rtts: tuple[float | None, ...], sizes: tuple[int, ...]
) -> list[tuple[float | None, int]]:
    """The (round trip, institutions) points to run: every round trip at every size.

    A round trip of ``None`` is plain loopback, without a relay.
    """
    return [(rtt, n) for n in sizes for rtt in rtts]


def run_hybrid_scale(
    *,
    root: Path | None,
    settings: HybridSettings,
    rtts: tuple[float | None, ...],
    sizes: tuple[int, ...],
    json_out: Path | None,
    quick: bool,
    plots_dir: Path | None = None,
    markdown: Path | None = None,
) -> dict[str, Any]:
    """Run both modes at every (round trip, size) point; write JSON, plots and the summary."""
    from medledger.localnet.relay import probe_netem

    if quick:
        settings = HybridSettings.quick(settings)
    console = Console(stderr=True)
    settings = dataclasses.replace(settings, orderings=(ORDERING,))
    results = results_header(settings.to_json(), quick)
    results["link_emulation"] = probe_netem()
    if results["link_emulation"] == "netem":
        # netem is there, but the netem path is not built yet: say what was really used.
        results["link_emulation"] = "userspace relay (netem available, not yet used)"
    results["load_average_at_start"] = _load_average()
    results["runs"] = []
    started = time.perf_counter()
    with (
        work_dir(root, "hybrid-scale") as base,
        sweep_progress(console) as progress,
    ):
        for rtt, size in scale_points(rtts, sizes):
            point = dataclasses.replace(settings, rtt_ms=rtt, institutions=size)
            for mode in settings.modes:
                results["runs"].append(
                    run_per_institution(base / f"{size}-{rtt}", mode, ORDERING, point, progress)
                )
    finish_results(results, started)
    # Which layout the delayed points ran in (namespaces where they can be made; see hybrid_procs).
    results["network_layout"] = ", ".join(
        dict.fromkeys(r["network_layout"] for r in results["runs"])
    )
    results["load_average_at_end"] = _load_average()
    results["points"] = points(results["runs"])
    results["targets"] = targets(results["points"], settings)
    if plots_dir is not None:
        results["plots"] = _draw(results, plots_dir, console)
    _print(results)
    if json_out is not None:
        write_json(json_out, results)
    if markdown is not None:
        from medledger.benchmarks.report import update_markdown

        update_markdown(markdown, {"hybrid-scale": results})
    return results


def _load_average() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def points(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (round trip, size): hybrid vs consortium-only, in total and per institution."""
    out = []
    keys = dict.fromkeys((r["rtt_ms"], r["institutions"]) for r in runs)
    for rtt, size in keys:
        here = [r for r in runs if r["rtt_ms"] == rtt and r["institutions"] == size]
        by_mode = {r["mode"]: r for r in here}
        comparison = compare(here)
        row: dict[str, Any] = {"rtt_ms": rtt, "institutions": size}
        interval = by_mode.get(HYBRID, {}).get("anchor_interval_ms")
        if interval is not None:
            row["anchor_interval_ms"] = interval
        for mode in (HYBRID, CONSORTIUM_ONLY):
            run = by_mode.get(mode)
            if run is None:
                continue
            key = mode.replace("-", "_")
            row[f"{key}_throughput_per_s"] = run["saturation_per_s"]
            row[f"{key}_throughput_per_institution_per_s"] = round(
                run["saturation_per_s"] / size, 1
            )
            row[f"{key}_saturated"] = run["saturated"]
        if comparison:
            row["loads"] = comparison[0]["loads"]
            row["throughput_ratio"] = comparison[0]["saturation_ratio"]
        out.append(row)
    return out


def targets(rows: list[dict[str, Any]], settings: HybridSettings) -> list[dict[str, Any]]:
    """Each target of issue #20 that the sweep can check: what was measured, and met or not."""
    checks: list[dict[str, Any]] = []
    below = [
        (row["rtt_ms"], row["institutions"], load)
        for row in rows
        if (row["rtt_ms"] or 0) >= 10
        for load in row.get("loads", [])
        if not load["consortium_only_saturated"] and not load["hybrid_saturated"]
    ]
    if below:
        worst = min(
            min(load["validation_p50_ratio"] or 0.0, load["validation_p99_ratio"] or 0.0)
            for _, _, load in below
        )
        checks.append(
            {
                "id": "validation_ratio",
                "target": "validation p50 and p99 ratio >= 20x below saturation, RTT >= 10 ms",
                "measured": f"lowest ratio {worst:g}x over {len(below)} loads",
                "met": worst >= VALIDATION_RATIO_TARGET,
            }
        )
    elif any((row["rtt_ms"] or 0) >= 10 for row in rows):
        checks.append(
            {
                "id": "validation_ratio",
                "target": "validation p50 and p99 ratio >= 20x below saturation, RTT >= 10 ms",
                "measured": "no offered load below saturation in both modes",
                "met": False,
            }
        )
    default_interval = settings.anchor_interval()
    tamper = [
        (
            row["rtt_ms"] or 0.0,
            load["hybrid_tamper_p99_ms"],
            row.get("anchor_interval_ms", default_interval),
        )
        for row in rows
        for load in row.get("loads", [])
        if not load["hybrid_saturated"]
    ]
    if tamper:
        over = [
            (rtt, p99)
            for rtt, p99, interval in tamper
            if p99 > interval + 3 * rtt + TAMPER_SLACK_MS
        ]
        checks.append(
            {
                "id": "tamper_evidence",
                "target": "hybrid tamper-evidence p99 <= anchor interval + 3 RTT + 100 ms",
                "measured": f"{len(tamper) - len(over)} of {len(tamper)} loads within"
                + (f"; worst {max(p for _, p in over):g} ms" if over else ""),
                "met": not over,
            }
        )
    biggest = max((row["institutions"] for row in rows), default=0)
    at_biggest = [r for r in rows if r["institutions"] == biggest and "throughput_ratio" in r]
    if at_biggest:
        ratio = min(r["throughput_ratio"] or 0.0 for r in at_biggest)
        checks.append(
            {
                "id": "throughput_ratio",
                "target": f"aggregate throughput hybrid / consortium-only >= 5x at {biggest}"
                " institutions (16 asked)",
                "measured": f"{ratio:g}x",
                "met": ratio >= THROUGHPUT_RATIO_TARGET and biggest >= 16,
            }
        )
    sizes = sorted({r["institutions"] for r in rows})
    if len(sizes) > 1 and settings.cpu_per_institution is not None:
        per = [
            r["hybrid_throughput_per_institution_per_s"]
            for r in rows
            if "hybrid_throughput_per_institution_per_s" in r
        ]
        spread = (max(per) - min(per)) / max(per) if per and max(per) > 0 else 1.0
        checks.append(
            {
                "id": "flat_per_institution",
                "target": f"hybrid throughput per institution flat within 20 % from {sizes[0]}"
                f" to {sizes[-1]}",
                "measured": f"spread {spread:.0%} ({', '.join(f'{p:g}' for p in per)} /s)",
                "met": spread <= FLAT_WITHIN,
            }
        )
    return checks


def _draw(results: dict[str, Any], plots_dir: Path, console: Console) -> list[str]:
    from medledger.benchmarks.report import PLOTS_SKIPPED, plot_hybrid_scale, plots_available

    if not plots_available():
        console.print(PLOTS_SKIPPED, markup=False, highlight=False)
        return []
    return [str(p) for p in plot_hybrid_scale(results, plots_dir)]


def _print(results: dict[str, Any]) -> None:
    console = Console()
    table = Table(
        title=(
            "medledger bench hybrid at scale"
            f" ({results['link_emulation']}; {results['network_layout']})"
        )
    )
    for col in (
        "RTT ms",
        "institutions",
        "anchor ms",
        "hybrid /s (per inst.)",
        "consortium-only /s (per inst.)",
        "throughput ratio",
        "validation p50 ratio by load",
    ):
        table.add_column(col, justify="right")
    for row in results["points"]:
        table.add_row(
            "loopback" if row["rtt_ms"] is None else f"{row['rtt_ms']:g}",
            str(row["institutions"]),
            str(row.get("anchor_interval_ms", "")),
            f"{row.get('hybrid_throughput_per_s', 0):,.0f}"
            f" ({row.get('hybrid_throughput_per_institution_per_s', 0):,.1f})",
            f"{row.get('consortium_only_throughput_per_s', 0):,.0f}"
            f" ({row.get('consortium_only_throughput_per_institution_per_s', 0):,.1f})",
            str(row.get("throughput_ratio")),
            ", ".join(
                f"{x['offered_per_s']}/s {x['validation_p50_ratio']}x" for x in row.get("loads", [])
            ),
        )
    console.print(table)
    for check in results["targets"]:
        console.print(
            f"{'met' if check['met'] else 'NOT met'}: {check['target']} — {check['measured']}"
        )
