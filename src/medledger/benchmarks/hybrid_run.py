"""``medledger bench hybrid``: every (mode, ordering) run, then the JSON, plots and summary.

What is measured and how is described in ``benchmarks.hybrid``. Each run
has every institution in its own process (``hybrid_procs``) or, with
``one_process``, all of them in this one (``hybrid.run_one_process``). This
driver sits above both, so neither imports the other's caller.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from medledger.benchmarks.common import (
    finish_results,
    results_header,
    sweep_progress,
    work_dir,
    write_json,
)
from medledger.benchmarks.hybrid import HybridSettings, draw_plots, run_one_process
from medledger.benchmarks.hybrid_procs import run_per_institution
from medledger.benchmarks.hybrid_summary import compare, print_summary

__all__ = ["run_hybrid_bench"]


def run_hybrid_bench(
    *,
    root: Path | None,
    settings: HybridSettings,
    json_out: Path | None,
    quick: bool,
    plots_dir: Path | None = None,
    markdown: Path | None = None,
) -> dict[str, Any]:
    """Run every (mode, ordering) in ``settings``; write JSON, plots and the summary."""
    if quick:
        settings = HybridSettings.quick(settings)
    console = Console(stderr=True)
    results = results_header(settings.to_json(), quick)
    results["runs"] = []
    started = time.perf_counter()
    with (
        work_dir(root, "hybrid") as base,
        sweep_progress(console) as progress,
    ):
        for ordering in settings.orderings:
            for mode in settings.modes:
                if settings.one_process:
                    run = asyncio.run(run_one_process(base, mode, ordering, settings, progress))
                else:
                    run = run_per_institution(base, mode, ordering, settings, progress)
                results["runs"].append(run)
    finish_results(results, started)
    results["comparison"] = compare(results["runs"])
    if plots_dir is not None:
        results["plots"] = draw_plots(results, plots_dir, console)
    print_summary(results)
    if json_out is not None:
        write_json(json_out, results)
    if markdown is not None:
        from medledger.benchmarks.report import update_markdown

        update_markdown(markdown, {"hybrid": results})
    return results
