"""``medledger bench api``: FHIR creates and reads over HTTP against the in-process API.

The server is one ``medledger node start`` process (uvicorn, one event loop,
as an institution runs it) on loopback. Clients are ``clients`` (64 by
default) ``aiohttp`` sessions with one keep-alive connection each,
in one client process or split over several (``client_processes``) so a
single Python client process being the bottleneck shows. Every client sends
its next request as soon as the last one answers (closed loop).

* **creates** — ``POST /fhir/{type}`` of synthetic resources
  (``synthetic``): validate, seal, blob, index, durable private-chain
  commit (group commit), 201 with the stored resource.
* **reads** — ``GET /fhir/{type}/{id}`` of resources just created, in random
  order: chain check, blob, unwrap, decrypt, plus an ``access`` entry on the
  private chain per read (group-committed, durable before the answer).
* **healthz** — ``GET /healthz`` by the same clients: no token, no storage,
  a constant answer; the floor of the HTTP stack (uvicorn, h11, FastAPI,
  the metrics middleware) on this machine.

The in-process baseline runs the same number of concurrent tasks calling
``node.records.create`` / ``node.records.read`` on a fresh node in this
process, and once more with the read's ``access`` entry written the way the
API does, so the HTTP share and the audit share of a read are both visible.
CPU time of the server process and of the client processes is recorded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from rich.console import Console
from rich.table import Table

from medledger.benchmarks.common import (
    BENCH_KDF,
    BENCH_PASSPHRASE,
    finish_results,
    gather_timed,
    percentiles,
    results_header,
    work_dir,
    write_json,
)
from medledger.ledger.clock import SystemClock
from medledger.localnet.nodeproc import NodeProcess, tree_pids
from medledger.node import Node, init_node, open_node
from medledger.services.access import ALLOWED, AccessEntry
from medledger.services.fhir import FHIR_JSON
from medledger.storage.sqlite.tokens import SqliteTokenStore
from medledger.synthetic import iter_patients

__all__ = ["ApiServer", "ApiSettings", "bench_resources", "http_run", "run_api_bench"]

_PER_PATIENT = 20


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiSettings:
    creates: int = 10_000
    reads: int = 20_000
    clients: int = 64
    client_processes: tuple[int, ...] = (1,)
    warmup: int = 200
    seed: int = 11

    @classmethod
    def quick(cls, base: ApiSettings) -> ApiSettings:
        return cls(
            creates=min(base.creates, 300),
            reads=min(base.reads, 600),
            clients=base.clients,
            client_processes=base.client_processes[:1] or (1,),
            warmup=min(base.warmup, 20),
            seed=base.seed,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "creates": self.creates,
            "reads": self.reads,
            "clients": self.clients,
            "client_processes": list(self.client_processes),
            "warmup": self.warmup,
            "seed": self.seed,
        }


def bench_resources(count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` synthetic resources without ids (the server assigns them), patients first."""
    out: list[dict[str, Any]] = []
    patients = -(-count // (_PER_PATIENT + 1))
    for bundle in iter_patients(patients, seed=seed, resources_per_patient=_PER_PATIENT):
        for r in bundle.all_resources():
            out.append({k: v for k, v in r.items() if k != "id"})
    return out[:count]


def _split(items: list[Any], parts: int) -> list[list[Any]]:
    return [items[i::parts] for i in range(parts)]


# -- HTTP side ------------------------------------------------------------------------


class ApiServer:
    """``medledger node start`` on a fresh node with a clinician token, in its own process."""

    def __init__(self, root: Path, workers: int = 1, cgroup_procs: Path | None = None) -> None:
        """``cgroup_procs``: run the node's whole process tree in that cgroup."""
        init_node(root, name="Bench Api Hospital", passphrase=BENCH_PASSPHRASE, kdf=BENCH_KDF)
        tokens = SqliteTokenStore(root / "tokens.db")
        try:
            self.token, _ = tokens.create(
                role="clinician", now_ms=SystemClock().now_ms(), label="bench api"
            )
        finally:
            tokens.close()
        self._node = NodeProcess(
            root, passphrase=BENCH_PASSPHRASE, workers=workers, cgroup_procs=cgroup_procs
        )
        self.url = self._node.url

    def pids(self) -> list[int]:
        """The node's processes now: the parent (sequencer) and its API workers."""
        return tree_pids(self._node.proc.pid)

    def cpu_s(self) -> float:
        return self._node.cpu_s()

    def stop(self) -> None:
        self._node.stop()


async def _client_async(
    url: str, token: str, op: str, items: list[Any], concurrency: int
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON}
    # aiohttp, one keep-alive connection per task: the load generator must cost far
    # less than the server, and httpx spends more CPU per request than the server's
    # whole /healthz here (decision 0013).
    lat: list[float] = []
    created: list[str] = []
    errors: list[str] = []
    todo = iter(items)

    async def request(session: aiohttp.ClientSession, item: Any) -> tuple[int, str, str]:
        if op == "create":
            call = session.post(f"{url}/fhir/{item['resourceType']}", data=item["body"])
        elif op == "healthz":
            call = session.get(f"{url}/healthz")
        else:
            call = session.get(f"{url}/fhir/{item}")
        async with call as r:
            text = await r.text()
            return r.status, text, r.headers.get("location", "")

    async def worker(session: aiohttp.ClientSession) -> None:
        for item in todo:
            t = time.perf_counter()
            try:
                status, text, location = await request(session, item)
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors.append(type(exc).__name__)
                continue
            lat.append(time.perf_counter() - t)
            if status not in (200, 201):
                errors.append(f"{status}: {text[:200]}")
            elif op == "create":
                created.append("/".join(location.split("/")[2:4]))

    sessions = [
        aiohttp.ClientSession(
            headers=headers,
            connector=aiohttp.TCPConnector(limit=1),
            timeout=aiohttp.ClientTimeout(total=60),
        )
        for _ in range(concurrency)
    ]
    try:
        # Connect every client first, so the measured run is all keep-alive requests.
        await asyncio.gather(*(_connect(s, url) for s in sessions))
        cpu = time.process_time()
        start = time.perf_counter()
        await asyncio.gather(*(worker(s) for s in sessions))
        end = time.perf_counter()
        cpu = time.process_time() - cpu
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
    return {
        "start": start,
        "end": end,
        "latencies": lat,
        "created": created,
        "errors": errors,
        "cpu_s": cpu,
    }


async def _connect(session: aiohttp.ClientSession, url: str) -> None:
    async with session.get(f"{url}/healthz") as r:
        await r.read()


def _client_process(url: str, token: str, op: str, items: list[Any], concurrency: int) -> Any:
    """One client process's share (runs in a spawned process)."""
    return asyncio.run(_client_async(url, token, op, items, concurrency))


def http_run(
    pool: concurrent.futures.Executor,
    server: ApiServer,
    op: str,
    items: list[Any],
    clients: int,
    processes: int,
) -> tuple[dict[str, Any], list[str]]:
    """``items`` over HTTP by ``clients`` connections split over ``processes`` processes."""
    per = [clients // processes + (i < clients % processes) for i in range(processes)]
    cpu = server.cpu_s()
    futures = [
        pool.submit(_client_process, server.url, server.token, op, share, c)
        for share, c in zip(_split(items, processes), per, strict=True)
    ]
    parts = [f.result() for f in futures]
    server_cpu = server.cpu_s() - cpu
    elapsed = max(p["end"] for p in parts) - min(p["start"] for p in parts)
    lat = [x for p in parts for x in p["latencies"]]
    errors = [e for p in parts for e in p["errors"]]
    return {
        "client_processes": processes,
        "clients": clients,
        "requests": len(lat),
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "per_s": round(len(lat) / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_ms": percentiles(lat),
        "server_cpu_ms_per_request": round(server_cpu * 1000 / max(len(lat), 1), 3),
        "server_cpu_utilization": round(server_cpu / elapsed, 2) if elapsed > 0 else 0.0,
        "client_cpu_ms_per_request": round(
            sum(p["cpu_s"] for p in parts) * 1000 / max(len(lat), 1), 3
        ),
        # Cores the load generator used; one client process near 1.0 is the bottleneck.
        "client_cpu_utilization": round(sum(p["cpu_s"] for p in parts) / elapsed, 2)
        if elapsed > 0
        else 0.0,
        "client_cpu_utilization_max_process": round(max(p["cpu_s"] for p in parts) / elapsed, 2)
        if elapsed > 0
        else 0.0,
    }, [c for p in parts for c in p["created"]]


# -- in-process side ------------------------------------------------------------------


async def _in_process(
    root: Path, resources: list[dict[str, Any]], reads: int, clients: int, seed: int
) -> dict[str, Any]:
    init_node(root, name="Bench Api Hospital", passphrase=BENCH_PASSPHRASE, kdf=BENCH_KDF)
    node = open_node(root, BENCH_PASSPHRASE)
    try:
        created: list[tuple[str, str]] = []

        async def create(item: dict[str, Any]) -> None:
            stored = await node.records.create(item)
            created.append((stored.resource_type, stored.id))

        creates = await _closed_loop(resources, clients, create)
        order = random.Random(seed).choices(created, k=reads)  # noqa: S311 - sampling

        async def read(key: tuple[str, str]) -> None:
            await node.records.read(*key)

        async def read_audited(key: tuple[str, str]) -> None:
            stored = await node.records.read(*key)
            await node.access.record_many([_access_entry(node, stored)])

        return {
            "creates": creates,
            "reads": await _closed_loop(order, clients, read),
            "reads_with_access_entry": await _closed_loop(order, clients, read_audited),
        }
    finally:
        await node.close()


def _access_entry(node: Node, stored: Any) -> AccessEntry:
    """The entry ``GET /fhir/{type}/{id}`` writes for a clinician's read."""
    return AccessEntry(
        reader=node.config.institution,
        holder=node.config.institution,
        patient=stored.patient or "",
        consent="",
        resource=f"{stored.resource_type}:{node.records.record_ref(stored.resource_type, stored.id)}",
        outcome=ALLOWED,
        actor="clinician:bench",
    )


async def _closed_loop(items: list[Any], clients: int, call: Any) -> dict[str, Any]:
    todo = iter(items)
    lat: list[float] = []

    async def worker() -> None:
        for item in todo:
            t = time.perf_counter()
            await call(item)
            lat.append(time.perf_counter() - t)

    elapsed, cpu = await gather_timed(worker() for _ in range(clients))
    return {
        "clients": clients,
        "requests": len(lat),
        "per_s": round(len(lat) / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_ms": percentiles(lat),
        "cpu_ms_per_request": round(cpu * 1000 / max(len(lat), 1), 3),
    }


# -- the run --------------------------------------------------------------------------


def run_api_bench(
    *, root: Path | None, settings: ApiSettings, json_out: Path | None, quick: bool
) -> dict[str, Any]:
    """HTTP creates and reads per client-process count, then the in-process baseline."""
    if quick:
        settings = ApiSettings.quick(settings)
    console = Console(stderr=True)
    rng = random.Random(settings.seed)  # noqa: S311 - reproducible sampling
    runs = len(settings.client_processes)
    resources = bench_resources(settings.warmup + settings.creates * runs, settings.seed)
    bodies = [{"resourceType": r["resourceType"], "body": orjson.dumps(r)} for r in resources]
    results = results_header(settings.to_json(), quick)
    results["http"] = {"creates": [], "reads": []}
    started = time.perf_counter()
    with work_dir(root, "api") as root:
        server = ApiServer(root / "http-node")
        try:
            spawn = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(
                max(settings.client_processes), mp_context=spawn
            ) as pool:
                warm, ids = http_run(
                    pool, server, "create", bodies[: settings.warmup], settings.clients, 1
                )
                if warm["errors"]:
                    raise RuntimeError(f"warm-up creates failed: {warm['first_error']}")
                http_run(pool, server, "read", ids, settings.clients, 1)
                offset = settings.warmup
                for p in settings.client_processes:
                    chunk = bodies[offset : offset + settings.creates]
                    offset += settings.creates
                    run, new = http_run(pool, server, "create", chunk, settings.clients, p)
                    ids += new
                    results["http"]["creates"].append(run)
                    console.log(f"HTTP creates, {p} client process(es): {_line(run)}")
                for p in settings.client_processes:
                    order = rng.choices(ids, k=settings.reads)
                    run, _ = http_run(pool, server, "read", order, settings.clients, p)
                    results["http"]["reads"].append(run)
                    console.log(f"HTTP reads, {p} client process(es): {_line(run)}")
                # The floor of the HTTP stack: no token, no storage, a constant answer.
                floor = [None] * min(settings.reads, 5_000)
                run, _ = http_run(pool, server, "healthz", floor, settings.clients, 1)
                results["http"]["healthz"] = run
                console.log(f"HTTP GET /healthz: {_line(run)}")
        finally:
            server.stop()
        # The same resources and read count, in this process on a fresh node.
        results["in_process"] = asyncio.run(
            _in_process(
                root / "in-process-node",
                resources[settings.warmup : settings.warmup + settings.creates],
                settings.reads,
                settings.clients,
                settings.seed,
            )
        )
        console.log(f"in-process creates: {_line(results['in_process']['creates'])}")
        console.log(f"in-process reads: {_line(results['in_process']['reads'])}")
    finish_results(results, started)
    results["ratio"] = _ratios(results)
    _print(results)
    if json_out is not None:
        write_json(json_out, results)
    return results


def _line(run: dict[str, Any]) -> str:
    lat = run["latency_ms"]
    return f"{run['per_s']:,}/s, p50 {lat['p50']} ms, p99 {lat['p99']} ms"


def _ratios(results: dict[str, Any]) -> dict[str, Any]:
    """In-process throughput over the best HTTP throughput (how much HTTP costs), and
    the CPU ratios of issue 19 (:func:`_cpu_ratios`)."""
    out: dict[str, Any] = {"cpu": _cpu_ratios(results)}
    ip = results["in_process"]
    for op, base in (("creates", ip["creates"]), ("reads", ip["reads"])):
        runs = results["http"][op]
        if not runs:
            continue
        best = max(runs, key=lambda r: r["per_s"])
        out[op] = {
            "best_http_per_s": best["per_s"],
            "best_http_client_processes": best["client_processes"],
            "in_process_per_s": base["per_s"],
            "in_process_over_http": round(base["per_s"] / best["per_s"], 2)
            if best["per_s"]
            else None,
        }
    if results["http"]["reads"]:
        best = max(r["per_s"] for r in results["http"]["reads"])
        audited = ip["reads_with_access_entry"]["per_s"]
        out["reads_with_access_entry"] = {
            "in_process_per_s": audited,
            "in_process_over_http": round(audited / best, 2) if best else None,
        }
    return out


def _cpu_ratios(results: dict[str, Any]) -> dict[str, Any]:
    """Server CPU per request against a floor measured in the same run (process CPU
    time, not wall time: it holds on a shared, loaded machine).

    ``read_over_empty``: CPU per FHIR read (with its ``access`` entry) over CPU
    per ``GET /healthz`` on the same server — what a read adds to the HTTP stack.
    ``http_create_over_in_process``: CPU per ``POST /fhir/{type}`` over CPU per
    ``node.records.create`` in this process — what HTTP adds to a create.
    Target of each: ≤ 2. The lowest CPU per request of the runs is taken.
    """
    http, ip = results["http"], results["in_process"]
    out: dict[str, Any] = {"target": 2.0}
    empty = http.get("healthz", {}).get("server_cpu_ms_per_request")
    if http["reads"] and empty:
        read = min(r["server_cpu_ms_per_request"] for r in http["reads"])
        out["read_ms"], out["empty_ms"] = read, empty
        out["read_over_empty"] = round(read / empty, 2)
    in_process = ip["creates"]["cpu_ms_per_request"]
    if http["creates"] and in_process:
        create = min(r["server_cpu_ms_per_request"] for r in http["creates"])
        out["http_create_ms"], out["in_process_create_ms"] = create, in_process
        out["http_create_over_in_process"] = round(create / in_process, 2)
    return out


def _print(results: dict[str, Any]) -> None:
    t = Table(title="medledger bench api (FHIR over HTTP vs in-process)")
    for col in ("path", "op", "client procs", "per s", "p50 / p95 / p99 ms", "server CPU ms/req"):
        t.add_column(col, justify="right")
    for op in ("creates", "reads"):
        for r in results["http"][op]:
            lat = r["latency_ms"]
            t.add_row(
                "HTTP",
                op,
                str(r["client_processes"]),
                f"{r['per_s']:,}",
                f"{lat['p50']} / {lat['p95']} / {lat['p99']}",
                str(r["server_cpu_ms_per_request"]),
            )
    for op, r in results["in_process"].items():
        lat = r["latency_ms"]
        t.add_row(
            "in-process",
            op,
            "-",
            f"{r['per_s']:,}",
            f"{lat['p50']} / {lat['p95']} / {lat['p99']}",
            str(r["cpu_ms_per_request"]),
        )
    Console().print(t)
    for op, r in results["ratio"].items():
        if op != "cpu":
            Console().print(f"{op}: in-process / HTTP = {r['in_process_over_http']}x")
    cpu = results["ratio"]["cpu"]
    if "read_over_empty" in cpu:
        Console().print(
            f"server CPU per FHIR read / per GET /healthz = {cpu['read_over_empty']}x "
            f"({cpu['read_ms']} / {cpu['empty_ms']} ms; target <= {cpu['target']}x)"
        )
    if "http_create_over_in_process" in cpu:
        Console().print(
            f"server CPU per HTTP create / in-process create = "
            f"{cpu['http_create_over_in_process']}x ({cpu['http_create_ms']} / "
            f"{cpu['in_process_create_ms']} ms; target <= {cpu['target']}x)"
        )
