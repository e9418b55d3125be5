"""``medledger bench tls``: what TLS costs, measured in one run against plaintext.

* **API** — one ``medledger node start`` process served twice, once over
  HTTPS (its pinned certificate, TLS 1.3) and once over plain HTTP on
  loopback (``--plain-http``). ``GET /healthz`` (no token, no storage: the
  HTTP stack's floor, where TLS's share is largest) by ``clients`` keep-alive
  connections, closed loop; then ``connections`` requests that each open a
  new connection (a full TCP + TLS handshake per request).
* **Cross-institution fetch** — a holder and a reader in one consortium
  (solo ordering), each served by uvicorn on loopback in this process:
  ``fetches`` verified ``/peer/v1`` fetches of a patient's records under
  consent, ``clients`` in flight, over mutual TLS (the genesis pins both
  certificates) and over plain HTTP (a genesis that pins none).
* **JetStream ordering** — one nats-server with JetStream (file store,
  ``sync_interval: always``) run twice: TLS with NKey authentication and
  member permissions (as ``network up`` configures it) and plaintext without
  authentication. ``publishes`` messages of 1 KiB through
  :class:`~medledger.ledger.ordering.jetstream.JetStreamOrderer`, one at a
  time (latency) and ``clients`` at a time (throughput).

Numbers are wall time on this machine, client and server sharing its cores.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.table import Table

from medledger.benchmarks.common import (
    BENCH_KDF,
    BENCH_PASSPHRASE,
    finish_results,
    percentiles,
    results_header,
    work_dir,
    write_json,
)
from medledger.config import institution_id
from medledger.core.consortium import ConsortiumParams
from medledger.ledger.clock import SystemClock
from medledger.ledger.ordering.jetstream import JetStreamOrderer
from medledger.localnet.loopback import loopback_socket, serve_nodes, url_of
from medledger.localnet.natsserver import (
    NatsCluster,
    NatsSecurity,
    NatsUser,
    member_permissions,
    member_subscriptions,
    new_nkey,
)
from medledger.localnet.network import LocalNetwork
from medledger.localnet.nodeproc import NodeProcess
from medledger.node import init_node, write_genesis
from medledger.services.tls import client_context, load_certificate, pem_bundle

__all__ = ["TlsSettings", "run_tls_bench"]

_STREAM, _SUBJECT = "CONSORTIUM", "consortium.order"


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsSettings:
    requests: int = 20_000
    connections: int = 500
    clients: int = 16
    publishes: int = 2_000
    fetches: int = 2_000

    @classmethod
    def quick(cls, settings: TlsSettings) -> TlsSettings:
        return cls(requests=200, connections=20, clients=settings.clients, publishes=50, fetches=40)


def _rate(count: int, wall_s: float) -> float:
    return round(count / wall_s, 1) if wall_s > 0 else 0.0


async def _keep_alive(url: str, tls: ssl.SSLContext | None, requests: int, clients: int) -> Any:
    latencies: list[float] = []
    todo = iter(range(requests))

    async def client() -> None:
        connector = aiohttp.TCPConnector(limit=1, ssl=tls if tls is not None else False)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in todo:
                start = time.perf_counter()
                async with session.get(url + "/healthz") as answer:
                    await answer.read()
                    if answer.status != 200:
                        raise RuntimeError(f"GET /healthz answered {answer.status}")
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - start
    return {
        "requests": requests,
        "per_s": _rate(requests, wall),
        "latency_ms": percentiles(latencies),
    }


async def _new_connections(url: str, tls: ssl.SSLContext | None, count: int) -> Any:
    latencies: list[float] = []
    for _ in range(count):
        connector = aiohttp.TCPConnector(force_close=True, ssl=tls if tls is not None else False)
        async with aiohttp.ClientSession(connector=connector) as session:
            start = time.perf_counter()
            async with session.get(url + "/healthz") as answer:
                await answer.read()
            latencies.append(time.perf_counter() - start)
    return {"requests": count, "latency_ms": percentiles(latencies)}


def _api(root: Path, settings: TlsSettings, console: Console) -> dict[str, Any]:
    init_node(root, name="Bench TLS", passphrase=BENCH_PASSPHRASE, kdf=BENCH_KDF)
    out: dict[str, Any] = {}
    for label, tls in (("tls", True), ("plaintext", False)):
        server = NodeProcess(root, passphrase=BENCH_PASSPHRASE, tls=tls)
        try:
            asyncio.run(_keep_alive(server.url, server.tls, 100, settings.clients))  # warm-up
            run = {
                "keep_alive": asyncio.run(
                    _keep_alive(server.url, server.tls, settings.requests, settings.clients)
                ),
                "new_connection": asyncio.run(
                    _new_connections(server.url, server.tls, settings.connections)
                ),
            }
        finally:
            server.stop()
        out[label] = run
        console.log(
            f"API {label}: {run['keep_alive']['per_s']} req/s keep-alive,"
            f" new connection p50 {run['new_connection']['latency_ms']['p50']} ms"
        )
    return out


async def _sharing_run(base: Path, tls: bool, settings: TlsSettings) -> dict[str, Any]:
    # Imported here: the sharing benchmark's setup and fetch loop, shared, not copied.
    from medledger.benchmarks.sharing import (
        INSTITUTION_NAMES,
        SharingNet,
        setup_sharing,
        timed_fetches,
    )

    ids = [institution_id(n) for n in INSTITUTION_NAMES]
    socks = {i: loopback_socket() for i in ids}
    urls = {i: url_of(sock, tls=tls) for i, sock in socks.items()}
    roots = []
    for name in INSTITUTION_NAMES:
        root = base / institution_id(name)
        init_node(root, name=name, passphrase=BENCH_PASSPHRASE, kdf=BENCH_KDF)
        if not tls:  # a genesis that pins no certificate: members talk plain HTTP
            (root / "tls.crt").unlink()
            (root / "tls.key").unlink()
        roots.append(root)
    write_genesis(
        "bench-tls",
        roots,
        time_ms=SystemClock().now_ms(),
        params=ConsortiumParams(),
        peer_urls=urls,
    )
    net = await LocalNetwork.open(base, passphrase=BENCH_PASSPHRASE)
    try:
        holder, reader = net.nodes[ids[0]], net.nodes[ids[1]]
        async with serve_nodes(net.nodes, socks, base, tls=tls):
            consent, stored = await setup_sharing(net, holder, reader, base, 8)
            n = SharingNet(
                net=net,
                holder_id=ids[0],
                holder_root=holder.paths.root,
                reader=reader,
                consent=consent,
                records=stored,
                holder_node=holder,
            )
            await timed_fetches(n, 20, settings.clients)  # warm-up (connections, caches)
            run: dict[str, Any] = await timed_fetches(n, settings.fetches, settings.clients, 20)
    finally:
        await net.close()
    if run["errors"]:
        raise RuntimeError(f"{run['errors']} fetches failed: {run['first_error']}")
    return run


def _sharing(base: Path, settings: TlsSettings, console: Console) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label in ("tls", "plaintext"):
        run = asyncio.run(_sharing_run(base / label, label == "tls", settings))
        out[label] = run
        console.log(
            f"fetch {label}: {run['fetches_per_s']} fetches/s with {settings.clients} in flight,"
            f" p50 {run['latency_ms']['p50']} ms"
        )
    return out


def _nats_security(base: Path) -> tuple[NatsSecurity, ssl.SSLContext, Path]:
    root = base / "member"
    init_node(root, name="Bench NATS", passphrase=BENCH_PASSPHRASE, kdf=BENCH_KDF)
    cert = load_certificate(root / "tls.crt")
    ca_file = base / "members.pem"
    ca_file.write_text(pem_bundle([cert]))
    seed, public = new_nkey()
    seed_path = base / "member.nk"
    seed_path.write_bytes(seed)
    security = NatsSecurity(
        cert_file=root / "tls.crt",
        key_file=root / "tls.key",
        ca_file=ca_file,
        users=(
            NatsUser(
                nkey=public,
                publish=member_permissions(_STREAM, _SUBJECT),
                subscribe=member_subscriptions(_SUBJECT),
            ),
        ),
    )
    return security, client_context([cert]), seed_path


async def _publishes(
    urls: list[str], tls: ssl.SSLContext | None, seed: Path | None, count: int, clients: int
) -> dict[str, Any]:
    orderer = await JetStreamOrderer.connect(
        urls, stream=_STREAM, subject=_SUBJECT, replicas=1, tls=tls, nkeys_seed=seed
    )
    payload = b"x" * 1024
    try:
        sequential: list[float] = []
        for i in range(count):
            start = time.perf_counter()
            await orderer.publish(f"s-{i}", payload)
            sequential.append(time.perf_counter() - start)
        todo = iter(range(count))

        async def client() -> None:
            for i in todo:
                await orderer.publish(f"c-{i}", payload)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - start
    finally:
        await orderer.close()
    return {
        "publishes": count,
        "sequential_latency_ms": percentiles(sequential),
        "concurrent_per_s": _rate(count, wall),
    }


async def _create_stream(urls: list[str], tls: ssl.SSLContext | None, seed: Path | None) -> None:
    creator = await JetStreamOrderer.connect(
        urls, stream=_STREAM, subject=_SUBJECT, replicas=1, tls=tls, nkeys_seed=seed
    )
    await creator.close()


def _jetstream(base: Path, settings: TlsSettings, console: Console) -> dict[str, Any]:
    out: dict[str, Any] = {}
    security, tls, seed = _nats_security(base)
    for label in ("tls", "plaintext"):
        secured = label == "tls"
        # The stream's creator needs stream-create rights: here the member's user may
        # not, so the plaintext run (no authorization) and an operator user make it.
        operator_seed, operator_public = new_nkey()
        (base / f"{label}-operator.nk").write_bytes(operator_seed)
        sec = (
            NatsSecurity(
                cert_file=security.cert_file,
                key_file=security.key_file,
                ca_file=security.ca_file,
                users=(*security.users, NatsUser(nkey=operator_public)),
            )
            if secured
            else None
        )
        cluster = NatsCluster(base / f"nats-{label}", size=1, security=(sec,) if sec else ())
        cluster.start()
        try:
            urls = cluster.client_urls()

            asyncio.run(
                _create_stream(
                    urls,
                    tls if secured else None,
                    base / f"{label}-operator.nk" if secured else None,
                )
            )
            run = asyncio.run(
                _publishes(
                    urls,
                    tls if secured else None,
                    seed if secured else None,
                    settings.publishes,
                    settings.clients,
                )
            )
        finally:
            cluster.stop()
        out[label] = run
        console.log(
            f"JetStream {label}: p50 {run['sequential_latency_ms']['p50']} ms sequential,"
            f" {run['concurrent_per_s']} msg/s with {settings.clients} in flight"
        )
    return out


def run_tls_bench(
    *, root: Path | None, settings: TlsSettings, json_out: Path | None, quick: bool
) -> dict[str, Any]:
    """The API, the cross-institution fetch and JetStream ordering over TLS and plaintext."""
    if quick:
        settings = TlsSettings.quick(settings)
    console = Console(stderr=True)
    # nats-py's TLS transport makes asyncio warn on every close: noise in the report.
    asyncio_log = logging.getLogger("asyncio")
    level = asyncio_log.level
    asyncio_log.setLevel(logging.ERROR)
    results = results_header(asdict(settings), quick)
    started = time.perf_counter()
    try:
        with work_dir(root, "tls") as base:
            results["api"] = _api(base / "api-node", settings, console)
            results["sharing"] = _sharing(base / "sharing", settings, console)
            results["jetstream"] = _jetstream(base / "jetstream", settings, console)
    finally:
        asyncio_log.setLevel(level)
    finish_results(results, started)
    results["measured_ms"] = SystemClock().now_ms()
    _print(results, console)
    if json_out is not None:
        write_json(json_out, results)
    return results


def _print(results: dict[str, Any], console: Console) -> None:
    api, js, fetch = results["api"], results["jetstream"], results["sharing"]
    table = Table("measure", "TLS", "plaintext")
    table.add_row(
        "API GET /healthz, keep-alive (req/s)",
        str(api["tls"]["keep_alive"]["per_s"]),
        str(api["plaintext"]["keep_alive"]["per_s"]),
    )
    for key in ("p50", "p99"):
        table.add_row(
            f"API keep-alive latency {key} (ms)",
            str(api["tls"]["keep_alive"]["latency_ms"][key]),
            str(api["plaintext"]["keep_alive"]["latency_ms"][key]),
        )
        table.add_row(
            f"API new connection per request {key} (ms)",
            str(api["tls"]["new_connection"]["latency_ms"][key]),
            str(api["plaintext"]["new_connection"]["latency_ms"][key]),
        )
        table.add_row(
            f"JetStream publish, one at a time, {key} (ms)",
            str(js["tls"]["sequential_latency_ms"][key]),
            str(js["plaintext"]["sequential_latency_ms"][key]),
        )
    table.add_row(
        f"Cross-institution fetches, {results['settings']['clients']} in flight (per s)",
        str(fetch["tls"]["fetches_per_s"]),
        str(fetch["plaintext"]["fetches_per_s"]),
    )
    for key in ("p50", "p99"):
        table.add_row(
            f"Cross-institution fetch latency {key} (ms)",
            str(fetch["tls"]["latency_ms"][key]),
            str(fetch["plaintext"]["latency_ms"][key]),
        )
    table.add_row(
        "JetStream publishes in flight (msg/s)",
        str(js["tls"]["concurrent_per_s"]),
        str(js["plaintext"]["concurrent_per_s"]),
    )
    console.print(table)
