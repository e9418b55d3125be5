"""CPU of a FHIR read against ``GET /healthz``, in process, through the node's ASGI app (issue 19).

Builds a fresh node in a temporary directory, creates ``--records`` synthetic
resources, then drives ``create_app``'s app directly (no HTTP server, no
client) with ``--clients`` concurrent tasks: ``GET /healthz`` and
``GET /fhir/{type}/{id}`` with a clinician token, in interleaved rounds so a
busy machine slows both alike. Prints the process CPU per request (best and
median of ``--rounds``) and their ratio. Every read writes its ``access``
entry, whose block the node commits in this process, so the figure includes
the read's share of its block. ``--profile`` then prints a cProfile of
``--reads`` more reads (cProfile inflates Python-heavy code: read it for
where, not how much). Run: ``python bench/read_cpu.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from medledger.api.app import create_app
from medledger.benchmarks.api import bench_resources
from medledger.benchmarks.common import BENCH_KDF, BENCH_PASSPHRASE
from medledger.heap import ready_heap_for_serving
from medledger.ledger.clock import SystemClock
from medledger.node import init_node, open_node
from medledger.storage.sqlite.tokens import SqliteTokenStore


def _scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench"), *headers],
        "client": ("127.0.0.1", 50_000),
        "server": ("bench", 80),
    }


async def _get(app: Any, path: str, headers: list[tuple[bytes, bytes]]) -> None:
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(_scope(path, headers), receive, send)
    if status != [200]:
        raise RuntimeError(f"GET {path} answered {status}")


async def _closed_loop(
    items: Iterable[Any], clients: int, call: Callable[[Any], Awaitable[None]]
) -> None:
    todo = iter(items)

    async def client() -> None:
        for item in todo:
            await call(item)

    await asyncio.gather(*(client() for _ in range(clients)))


async def _run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="medledger-read-cpu-"))
    root = tmp / "node"
    init_node(root, name="Read CPU Bench", passphrase=BENCH_PASSPHRASE, kdf=BENCH_KDF)
    tokens = SqliteTokenStore(root / "tokens.db")
    node = open_node(root, BENCH_PASSPHRASE)
    try:
        token, _ = tokens.create(role="clinician", now_ms=SystemClock().now_ms())
        app = create_app(node, tokens)
        auth = [(b"authorization", f"Bearer {token}".encode())]
        paths: list[str] = []

        async def create(resource: dict[str, Any]) -> None:
            stored = await node.records.create(resource)
            paths.append(f"/fhir/{stored.resource_type}/{stored.id}")

        await _closed_loop(bench_resources(args.records, 11), args.clients, create)
        order = random.Random(19).choices(paths, k=args.reads)

        async def read(path: str) -> None:
            await _get(app, path, auth)

        async def healthz(_: Any) -> None:
            await _get(app, "/healthz", [])

        calls = {"healthz": (healthz, range(args.reads)), "read": (read, order)}
        for call, items in calls.values():  # warm-up: imports, caches, first blocks
            await _closed_loop(list(items)[:300], args.clients, call)
        ready_heap_for_serving()  # as node start does before it serves
        per_request: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, (call, items) in calls.items():
                started = time.process_time()
                await _closed_loop(items, args.clients, call)
                per_request[name].append((time.process_time() - started) * 1e6 / args.reads)
        for name, values in per_request.items():
            print(
                f"{name:8s} best {min(values):7.1f} us, median {statistics.median(values):7.1f} us"
            )
        ratio = min(per_request["read"]) / min(per_request["healthz"])
        print(f"read / healthz (best of each): {ratio:.2f}x")
        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
            await _closed_loop(order, args.clients, read)
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(30)
    finally:
        await node.close()
        tokens.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=300)
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    asyncio.run(_run(parser.parse_args()))


if __name__ == "__main__":
    main()
