"""``medledger bench workers``: one node over HTTP with 1 and with N API worker processes.

For each worker count, on a fresh node (``node start --workers N``, plain HTTP
on loopback):

* **saturation** (closed loop, ``clients`` keep-alive connections): FHIR
  creates/s and reads/s, and the server's CPU per request (the whole process
  tree: the sequencer and its workers);
* **latency under load** (open loop): reads and creates sent at a fixed
  arrival rate of 50 % and 80 % of the saturation just measured, each
  request's latency counted from its *scheduled* send time, so a server that
  falls behind shows in p99 instead of slowing the client down.

The machine may be shared: the load average before and after each run is in
the results, and the CPU figures (per request, and the utilisation in cores)
say what the wall-clock figures cannot.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import random
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from rich.console import Console
from rich.table import Table

from medledger.benchmarks.api import ApiServer, bench_resources, http_run
from medledger.benchmarks.common import (
    finish_results,
    percentiles,
    results_header,
    work_dir,
    write_json,
)
from medledger.services.fhir import FHIR_JSON

__all__ = ["run_workers_bench"]

#: The open-loop rates, as fractions of the measured saturation.
LOAD_POINTS = (0.5, 0.8)


async def _open_loop_async(
    url: str, token: str, op: str, items: list[Any], rate: float, connections: int
) -> dict[str, Any]:
    """Send ``items`` at ``rate`` a second (whatever the answers do); latency from schedule."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON}
    connector = aiohttp.TCPConnector(limit=connections)
    lat: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(
        headers=headers, connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        # Open the connections first: the measured part is keep-alive requests.
        await asyncio.gather(*(session.get(f"{url}/healthz") for _ in range(connections)))

        async def one(item: Any, scheduled: float) -> None:
            nonlocal errors
            if op == "create":
                call = session.post(f"{url}/fhir/{item['resourceType']}", data=item["body"])
            else:
                call = session.get(f"{url}/fhir/{item}")
            try:
                async with call as r:
                    await r.read()
                    ok = r.status in (200, 201)
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                lat.append(time.perf_counter() - scheduled)
            else:
                errors += 1

        start = time.perf_counter()
        tasks = []
        for i, item in enumerate(items):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(item, scheduled)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return {
        "rate_per_s": round(rate, 1),
        "requests": len(lat),
        "errors": errors,
        "achieved_per_s": round(len(lat) / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_ms": percentiles(lat),
    }


def _open_loop(url: str, token: str, op: str, items: list[Any], rate: float) -> Any:
    return asyncio.run(_open_loop_async(url, token, op, items, rate, 256))


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_workers_bench(
    *,
    root: Path | None,
    workers: tuple[int, ...],
    creates: int,
    reads: int,
    clients: int,
    open_loop_s: float,
    json_out: Path | None,
    quick: bool,
) -> dict[str, Any]:
    """Saturation and open-loop latency with each worker count (module docstring)."""
    if quick:
        creates, reads, open_loop_s = min(creates, 150), min(reads, 300), min(open_loop_s, 1.5)
    console = Console(stderr=True)
    settings = {
        "workers": list(workers),
        "creates": creates,
        "reads": reads,
        "clients": clients,
        "open_loop_s": open_loop_s,
        "cores": os.cpu_count(),
    }
    results = results_header(settings, quick)
    results["runs"] = []
    started = time.perf_counter()
    rng = random.Random(7)  # noqa: S311 - reproducible sampling
    warmup = 50 if quick else 200
    resources = bench_resources(warmup + creates * 8, 7)
    bodies = [{"resourceType": r["resourceType"], "body": orjson.dumps(r)} for r in resources]
    spawn = multiprocessing.get_context("spawn")
    with (
        work_dir(root, "workers") as base,
        concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool,
    ):
        for count in workers:
            run: dict[str, Any] = {"workers": count, "load_before": _load()}
            server = ApiServer(base / f"node-{count}", count)
            try:
                offset = 0
                _, ids = http_run(pool, server, "create", bodies[:warmup], clients, 1)
                offset += warmup
                http_run(pool, server, "read", ids[:warmup], clients, 1)
                made, new = http_run(
                    pool, server, "create", bodies[offset : offset + creates], clients, 1
                )
                offset += creates
                ids += new
                read = http_run(pool, server, "read", rng.choices(ids, k=reads), clients, 1)[0]
                run["creates"], run["reads"] = made, read
                console.log(
                    f"{count} worker(s): creates {made['per_s']:,}/s "
                    f"({made['server_cpu_ms_per_request']} ms CPU), reads {read['per_s']:,}/s "
                    f"({read['server_cpu_ms_per_request']} ms CPU)"
                )
                run["open_loop"] = {"reads": [], "creates": []}
                for fraction in LOAD_POINTS:
                    for op, saturated in (("reads", read), ("creates", made)):
                        rate = max(1.0, saturated["per_s"] * fraction)
                        n = max(20, int(rate * open_loop_s))
                        if op == "reads":
                            items: list[Any] = rng.choices(ids, k=n)
                        else:
                            items = bodies[offset : offset + n]
                            offset += n
                            if len(items) < n:  # out of fresh bodies: reuse (new ids anyway)
                                items = (items * (n // max(len(items), 1) + 1))[:n] or bodies[:n]
                        point = pool.submit(
                            _open_loop, server.url, server.token, op[:-1], items, rate
                        ).result()
                        point["fraction"] = fraction
                        run["open_loop"][op].append(point)
                        lat = point["latency_ms"]
                        console.log(
                            f"  {op} at {int(fraction * 100)} % ({point['rate_per_s']:,}/s): "
                            f"p50 {lat['p50']} ms, p99 {lat['p99']} ms, errors {point['errors']}"
                        )
            finally:
                server.stop()
            run["load_after"] = _load()
            results["runs"].append(run)
    finish_results(results, started)
    results["scaling"] = _scaling(results["runs"])
    _print(results)
    if json_out is not None:
        write_json(json_out, results)
    return results


def _scaling(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each worker count's throughput over the 1-worker run's (wall clock and CPU-based)."""
    if not runs or runs[0]["workers"] != 1:
        return {}
    base = runs[0]
    out: dict[str, Any] = {}
    for run in runs[1:]:
        entry: dict[str, Any] = {}
        for op in ("creates", "reads"):
            b, r = base[op], run[op]
            entry[op] = {
                "throughput": round(r["per_s"] / b["per_s"], 2) if b["per_s"] else 0.0,
                # Cores the server used, and CPU per request: what the wall clock hides on
                # a shared machine.
                "cores_used": [b["server_cpu_utilization"], r["server_cpu_utilization"]],
                "cpu_ms_per_request": [
                    b["server_cpu_ms_per_request"],
                    r["server_cpu_ms_per_request"],
                ],
            }
        out[f"{run['workers']}_over_1"] = entry
    return out


def _print(results: dict[str, Any]) -> None:
    table = Table(title="HTTP with API worker processes")
    for column in (
        "workers",
        "op",
        "per s",
        "CPU ms/req",
        "cores used",
        "p50/p99 @50 %",
        "p99 @80 %",
        "load before/after",
    ):
        table.add_column(column)
    for run in results["runs"]:
        for op in ("reads", "creates"):
            sat = run[op]
            points = {p["fraction"]: p for p in run["open_loop"][op]}
            half, most = points.get(0.5), points.get(0.8)
            table.add_row(
                str(run["workers"]),
                op,
                f"{sat['per_s']:,}",
                str(sat["server_cpu_ms_per_request"]),
                str(sat["server_cpu_utilization"]),
                f"{half['latency_ms']['p50']}/{half['latency_ms']['p99']}" if half else "",
                str(most["latency_ms"]["p99"]) if most else "",
                f"{run['load_before'][0]}/{run['load_after'][0]}",
            )
    Console().print(table)
