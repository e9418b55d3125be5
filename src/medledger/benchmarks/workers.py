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

With ``cpu_per_worker`` (``--cpu-per-worker SHARE``) the node's whole process
tree (the sequencer parent and its N API workers) runs in a cgroup of its own
whose quota is N x SHARE cores (``localnet.cgroups``), joined before the node's
first instruction; the load generator stays outside and has the rest of the
machine. "N workers" then means "a machine of N x SHARE cores", which is what
the scaling ratio has to compare on a machine that also runs the client
(decision 0056). Each run records what the kernel held (quota, period), which
processes were in the group, and per closed-loop phase the group's throttling
(``cpu.stat``), the client's CPU and the machine's idle share; the group is
removed after the run, after a failure too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import os
import random
import time
import urllib.request
from dataclasses import dataclass
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
from medledger.localnet.cgroups import CpuGroups, CpuGroupsError, cpu_groups_unavailable_reason
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


def _machine_cpu() -> tuple[int, int]:
    """``(idle, total)`` jiffies of the whole machine so far (``/proc/stat``; idle + iowait)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields[:8])


def _private_height(url: str) -> int | None:
    """The node's private-chain height from its ``/metrics`` (``None`` if not there)."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as answer:  # noqa: S310 - loopback
            text = answer.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("medledger_private_height "):
            return int(float(line.split()[1]))
    return None


class _Phase:
    """Over one closed-loop phase: the machine's idle share, the node's cgroup throttling,
    and the private-chain blocks the phase cost (group commit: fewer, fuller blocks mean
    fewer signatures and syncs per request)."""

    def __init__(self, groups: CpuGroups | None, url: str) -> None:
        self._groups, self._url = groups, url
        self._height = _private_height(url)
        self._cpu = _machine_cpu()
        self._stat = groups.throttling(0) if groups is not None else None

    def finish(self, into: dict[str, Any]) -> None:
        idle, total = _machine_cpu()
        spent = total - self._cpu[1]
        into["machine_idle_share"] = round((idle - self._cpu[0]) / spent, 3) if spent > 0 else 0.0
        height = _private_height(self._url)
        if height is not None and self._height is not None:
            into["blocks"] = height - self._height
            into["requests_per_block"] = (
                round(into["requests"] / into["blocks"], 2) if into["blocks"] else None
            )
        if self._groups is None or self._stat is None:
            return
        now = self._groups.throttling(0)
        delta = {k: now[k] - self._stat[k] for k in now}
        into["throttling"] = {
            **delta,
            # The share of quota periods in which the node had used its whole quota.
            "throttled_share": round(delta["nr_throttled"] / delta["nr_periods"], 3)
            if delta["nr_periods"]
            else 0.0,
        }


def _membership(groups: CpuGroups, server: ApiServer) -> dict[str, Any]:
    """Which of the node's processes the kernel lists in its group, now."""
    node, inside = server.pids(), groups.pids(0)
    return {
        "node_pids": node,
        "group_pids": inside,
        "node_in_group": bool(node) and set(node) <= set(inside),
    }


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
    cpu_per_worker: float | None = None,
    client_processes: int = 1,
) -> dict[str, Any]:
    """Saturation and open-loop latency with each worker count (module docstring).

    Raises :class:`CpuGroupsError` before anything starts if ``cpu_per_worker`` is
    given and this machine cannot set CPU quotas (the reason), or if a group cannot
    be created, filled or removed."""
    if cpu_per_worker is not None:
        reason = cpu_groups_unavailable_reason()
        if reason is not None:
            raise CpuGroupsError(f"--cpu-per-worker: {reason}")
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
        "cpu_per_worker": cpu_per_worker,
        "client_processes": client_processes,
    }
    results = results_header(settings, quick)
    results["runs"] = []
    started = time.perf_counter()
    rng = random.Random(7)  # noqa: S311 - reproducible sampling
    warmup = 50 if quick else 200
    resources = bench_resources(warmup + creates * 8, 7)
    bodies = [{"resourceType": r["resourceType"], "body": orjson.dumps(r)} for r in resources]
    spawn = multiprocessing.get_context("spawn")
    plan = _Plan(
        bodies=bodies,
        rng=rng,
        warmup=warmup,
        creates=creates,
        reads=reads,
        clients=clients,
        processes=client_processes,
        open_loop_s=open_loop_s,
        console=console,
    )
    with (
        work_dir(root, "workers") as base,
        concurrent.futures.ProcessPoolExecutor(client_processes, mp_context=spawn) as pool,
    ):
        for count in workers:
            run: dict[str, Any] = {"workers": count, "load_before": _load()}
            with contextlib.ExitStack() as stack:
                groups = None
                if cpu_per_worker is not None:
                    groups = stack.enter_context(CpuGroups(1, count * cpu_per_worker))
                    quota_us, period_us = groups.quota(0)
                    run["cgroup"] = {
                        "version": groups.version,
                        "path": str(groups.group(0)),
                        "top": str(groups.top),
                        "quota_us": quota_us,
                        "period_us": period_us,
                        "quota_cores": round(quota_us / period_us, 3),
                    }
                server = ApiServer(
                    base / f"node-{count}",
                    count,
                    cgroup_procs=groups.procs_file(0) if groups is not None else None,
                )
                stack.callback(server.stop)
                _measure(run, server, groups, pool, plan)
            run["load_after"] = _load()
            results["runs"].append(run)
    finish_results(results, started)
    results["scaling"] = _scaling(results["runs"])
    _print(results)
    if json_out is not None:
        write_json(json_out, results)
    return results


@dataclass(frozen=True, slots=True, kw_only=True)
class _Plan:
    """What every worker count's run sends, and how."""

    bodies: list[dict[str, Any]]
    rng: random.Random
    warmup: int
    creates: int
    reads: int
    clients: int
    processes: int
    open_loop_s: float
    console: Console


def _measure(
    run: dict[str, Any],
    server: ApiServer,
    groups: CpuGroups | None,
    pool: concurrent.futures.Executor,
    plan: _Plan,
) -> None:
    """One worker count's closed-loop and open-loop phases on a running node, into ``run``."""
    bodies, rng, warmup, creates, reads = (
        plan.bodies,
        plan.rng,
        plan.warmup,
        plan.creates,
        plan.reads,
    )
    clients, processes, open_loop_s, console = (
        plan.clients,
        plan.processes,
        plan.open_loop_s,
        plan.console,
    )
    if groups is not None:
        run["cgroup"]["at_start"] = _membership(groups, server)
    offset = 0
    _, ids = http_run(pool, server, "create", bodies[:warmup], clients, processes)
    offset += warmup
    http_run(pool, server, "read", ids[:warmup], clients, processes)
    phase = _Phase(groups, server.url)
    made, new = http_run(
        pool, server, "create", bodies[offset : offset + creates], clients, processes
    )
    phase.finish(made)
    offset += creates
    ids += new
    phase = _Phase(groups, server.url)
    read = http_run(pool, server, "read", rng.choices(ids, k=reads), clients, processes)[0]
    phase.finish(read)
    run["creates"], run["reads"] = made, read
    console.log(
        f"{run['workers']} worker(s): creates {made['per_s']:,}/s "
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
            point = pool.submit(_open_loop, server.url, server.token, op[:-1], items, rate).result()
            point["fraction"] = fraction
            run["open_loop"][op].append(point)
            lat = point["latency_ms"]
            console.log(
                f"  {op} at {int(fraction * 100)} % ({point['rate_per_s']:,}/s): "
                f"p50 {lat['p50']} ms, p99 {lat['p99']} ms, errors {point['errors']}"
            )
    if groups is not None:
        run["cgroup"]["at_end"] = _membership(groups, server)
        run["cgroup"]["throttling_total"] = groups.throttling(0)


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
                # Under --cpu-per-worker: the node's quota in cores, and the share of quota
                # periods in which it was held (near 1: the quota, not the client, bound it).
                "quota_cores": [_quota_cores(base), _quota_cores(run)],
                "throttled_share": [_throttled(b), _throttled(r)],
                "client_cpu_utilization": [
                    b.get("client_cpu_utilization"),
                    r.get("client_cpu_utilization"),
                ],
                "quota_throughput": _quota_ratio(base, run, op),
            }
        out[f"{run['workers']}_over_1"] = entry
    return out


def _quota_ratio(base: dict[str, Any], run: dict[str, Any], op: str) -> float | None:
    """What the quotas allow, from CPU per request: ``(quota / CPU per request)`` of ``run``
    over that of ``base``. It is what the wall-clock ratio shows when both runs are held
    by their quotas (throttled share near 1); on a machine too busy to give the node its
    quota, the wall clock measures the machine and only this estimate is left."""
    base_quota, run_quota = _quota_cores(base), _quota_cores(run)
    base_cpu = float(base[op]["server_cpu_ms_per_request"])
    run_cpu = float(run[op]["server_cpu_ms_per_request"])
    if base_quota is None or run_quota is None or not base_cpu or not run_cpu:
        return None
    return round((run_quota / run_cpu) / (base_quota / base_cpu), 2)


def _quota_cores(run: dict[str, Any]) -> float | None:
    cgroup = run.get("cgroup")
    return float(cgroup["quota_cores"]) if cgroup else None


def _throttled(phase: dict[str, Any]) -> float | None:
    throttling = phase.get("throttling")
    return throttling["throttled_share"] if throttling else None


def _print(results: dict[str, Any]) -> None:
    console = Console()
    if not console.is_terminal:  # a log or a pipe: one row a line, not wrapped at 80
        console = Console(width=180)
    share = results["settings"].get("cpu_per_worker")
    title = "HTTP with API worker processes"
    if share is not None:
        title += f" (node in a cgroup of workers x {share:g} cores)"
    table = Table(title=title)
    for column in (
        "workers",
        "op",
        "per s",
        "CPU ms/req",
        "cores used",
        "quota",
        "throttled",
        "client cores",
        "idle",
        "req/block",
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
                f"{_quota_cores(run):g}" if _quota_cores(run) is not None else "-",
                _percent(_throttled(sat)),
                str(sat.get("client_cpu_utilization", "")),
                _percent(sat.get("machine_idle_share")),
                str(sat.get("requests_per_block", "-")),
                f"{half['latency_ms']['p50']}/{half['latency_ms']['p99']}" if half else "",
                str(most["latency_ms"]["p99"]) if most else "",
                f"{run['load_before'][0]}/{run['load_after'][0]}",
            )
    console.print(table)
    for name, entry in results.get("scaling", {}).items():
        console.print(
            f"{name.replace('_over_', ' workers / ')} worker: reads "
            f"{entry['reads']['throughput']}x, creates {entry['creates']['throughput']}x"
            + (
                f" (node quota {entry['reads']['quota_cores'][0]:g} -> "
                f"{entry['reads']['quota_cores'][1]:g} cores; from CPU per request the "
                f"quotas allow reads {entry['reads']['quota_throughput']}x, creates "
                f"{entry['creates']['quota_throughput']}x)"
                if entry["reads"]["quota_cores"][0] is not None
                else " (no CPU quota: the node and the client share the machine)"
            )
        )


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.0f} %"
