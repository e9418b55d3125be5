"""``bench hybrid`` with one process per institution, as institutions run.

The parent creates the nodes and the genesis, starts the ordering service
(a 3-node NATS JetStream cluster, or the solo order file that every process
opens) and one worker process per institution. Each worker opens its node,
joins the consortium, and writes its own institution's share of the same
workload (``hybrid.workload``, walked identically by every worker) through
the same :class:`~medledger.benchmarks.hybrid.BenchNetwork` code as the
one-process layout. For each offered load the parent has every worker
schedule its records, then gives them one start time on the system-wide
monotonic clock; the workers write, wait until their records are
tamper-evident, and send back their latencies. CPU is the parent's and all
its children's (workers and nats-servers), as in the one-process layout.

With ``rtt_ms`` (issue #20) NATS server *k* stands at institution *k*:
every route between servers and every connection from an institution to
another institution's server goes through a delaying relay
(``localnet.relay``, RTT/2 each way), and servers advertise the relay's
address, so neither route gossip nor client discovery can bypass it.
Where network namespaces can be made (root, ``ip``), each institution is a
host of its own (``localnet.hosts``): its worker and its NATS server run in
its namespace and listen on its address, the relays run in a thread of the
parent that entered the bridge's namespace, and nothing else can reach the
servers; elsewhere everything stays on the machine's loopback. The run's
``network_layout`` says which. With
``cpu_per_institution`` each institution's worker, and its NATS server, run
in a cgroup of their own with that quota (``localnet.cgroups``); the
parent, which only coordinates, and the relay thread in it stay outside.
With ``cpu_per_nats_server`` each NATS server instead runs in a group of
its own with that quota, so the ordering service's CPU is measured apart
from the members' (as with servers on machines of their own).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from rich.progress import Progress

from medledger.benchmarks.hybrid import (
    PASSPHRASE,
    BenchNetwork,
    HybridSettings,
    Step,
    create_nodes,
    offer,
    report_step,
    run_result,
    schedule,
    step_result,
    tree_cpu_s,
    workload,
)
from medledger.config import ConsortiumConfig
from medledger.core.consortium import HYBRID
from medledger.core.errors import MedledgerError
from medledger.heap import ready_heap_for_serving
from medledger.ledger.ordering.port import Orderer
from medledger.localnet.cgroups import CpuGroups
from medledger.localnet.hosts import HostNetwork, call_in_namespace, unavailable_reason
from medledger.localnet.netproc import create_order_file
from medledger.localnet.relay import LinkDelay, RelayGroup
from medledger.synthetic import iter_patients

__all__ = ["CpuPlacement", "run_per_institution"]

#: The consortium stream and subject every node uses by default.
STREAM, SUBJECT = ConsortiumConfig().stream, ConsortiumConfig().subject
#: Longest wait for a worker's answer (a step drains for up to 120 s).
_ANSWER_TIMEOUT_S = 300.0
#: Lead time between the start message and the shared start instant.
_START_LEAD_S = 0.1
#: Longest wait for the NATS cluster to form and the stream to be created.
_CLUSTER_START_S = 60.0
#: NATS servers of the ordering service (server *k* stands at institution *k*).
_SERVERS = 3
#: ``network_layout`` of a run: each institution a namespace, or all on one loopback.
NAMESPACES = "namespaces + userspace relay"
LOOPBACK_RELAY = "loopback + userspace relay"
LOOPBACK = "loopback"


class WorkerFailed(MedledgerError):
    """An institution's worker process failed or stopped answering."""


@dataclass(frozen=True, slots=True)
class _WorkerSpec:
    root: Path
    index: int
    mode: str
    ordering: str
    order_file: Path | None
    nats_urls: tuple[str, ...]
    settings: HybridSettings
    #: The ``ip netns`` name of the institution's host, or ``None`` (the parent's network).
    namespace: str | None = None


# -- the worker (one institution) ------------------------------------------------------


def _worker_main(spec: _WorkerSpec, conn: Connection) -> None:
    try:
        if spec.namespace is not None:
            # First thing, before any thread or socket: every one made later is inside.
            from medledger.localnet.hosts import enter_namespace

            enter_namespace(spec.namespace)
        asyncio.run(_serve(spec, conn))
    except BaseException as exc:  # report any failure to the parent, then exit
        conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()[-2000:]))
        raise
    finally:
        conn.close()


async def _orderer(spec: _WorkerSpec) -> Orderer:
    if spec.ordering == "solo":
        from medledger.ledger.ordering.solo import SoloOrderer

        assert spec.order_file is not None
        return SoloOrderer(spec.order_file)
    from medledger.ledger.ordering.jetstream import JetStreamOrderer

    return await JetStreamOrderer.connect(
        list(spec.nats_urls), stream=STREAM, subject=SUBJECT, replicas=3, create=False
    )


def _warm_fhir_models(settings: HybridSettings) -> None:
    """Validate one resource of each type the workload writes, before any step.

    A process's first resource of a type imports and builds its FHIR model
    (50-350 ms each, measured): paid inside the first measured step, it showed as
    that step's p99 rather than as anything hybrid or consortium-only does.
    """
    from medledger.services.fhir import validate_resource

    seen: set[str] = set()
    for bundle in iter_patients(4, seed=settings.seed, resources_per_patient=settings.per_patient):
        for resource in (bundle.patient, *bundle.resources):
            if resource["resourceType"] not in seen:
                seen.add(resource["resourceType"])
                validate_resource(resource)


async def _serve(spec: _WorkerSpec, conn: Connection) -> None:
    from medledger.localnet.network import LocalNetwork
    from medledger.node import open_node

    node = open_node(spec.root, PASSPHRASE)
    orderer = await _orderer(spec)
    await node.join_consortium(orderer, anchor=spec.mode == HYBRID)
    bench = BenchNetwork.over(
        LocalNetwork(spec.root.parent, {node.config.institution: node}, [orderer]), spec.mode
    )
    work = workload(spec.settings)
    _warm_fhir_models(spec.settings)
    ready_heap_for_serving()  # as ``node start`` does once it is open
    queues = None
    try:
        conn.send(("ready",))
        while True:
            command, *args = await asyncio.to_thread(conn.recv)
            if command == "schedule":
                load, count = args
                queues = schedule(work, load, count, spec.settings.institutions, only=spec.index)
                conn.send(("scheduled",))
            elif command == "go":
                start, load, count, measured = args
                assert queues is not None
                step = Step(load=load, records=count) if measured else None
                await offer(bench, queues, start, spec.settings.writers, step, lambda: None)
                drained = await bench.drained(120 if measured else 30)
                conn.send(("done", step, drained))
            elif command == "close":
                return
    finally:
        await bench.close()


# -- the parent ------------------------------------------------------------------------


class _Workers:
    """The worker processes of one run and the pipes to them."""

    def __init__(self, specs: list[_WorkerSpec]) -> None:
        context = multiprocessing.get_context("spawn")
        self._procs: list[Any] = []
        self._conns: list[Connection] = []
        for spec in specs:
            parent, child = context.Pipe()
            proc = context.Process(
                target=_worker_main, args=(spec, child), name=f"bench-{spec.index}"
            )
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)

    def pids(self) -> list[int]:
        return [int(proc.pid) for proc in self._procs]

    def ask(self, *message: Any) -> list[tuple[Any, ...]]:
        """Send ``message`` to every worker; return each one's answer."""
        for conn in self._conns:
            conn.send(message)
        return self.answers()

    def answers(self) -> list[tuple[Any, ...]]:
        out = []
        for n, conn in enumerate(self._conns):
            if not conn.poll(_ANSWER_TIMEOUT_S):
                raise WorkerFailed(f"institution worker {n} did not answer")
            try:
                answer = conn.recv()
            except EOFError:
                raise WorkerFailed(f"institution worker {n} exited") from None
            if answer[0] == "error":
                raise WorkerFailed(f"institution worker {n}: {answer[1]}\n{answer[2]}")
            out.append(answer)
        return out

    def close(self, *, abandon: bool = False) -> None:
        """Ask every worker to close its node and wait for them all (30 s in all, then
        SIGKILL). ``abandon`` (the run failed or was signalled): stop them at once
        instead, since a worker busy with a step would read the request only when the
        step is over."""
        for proc, conn in zip(self._procs, self._conns, strict=True):
            if abandon:
                proc.terminate()
            else:
                with contextlib.suppress(OSError):  # already gone
                    conn.send(("close",))
        deadline = time.monotonic() + 30
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self._conns:
            conn.close()


def _steps(
    workers: _Workers,
    settings: HybridSettings,
    progress: Progress,
    label: str,
    idle_cores: float,
) -> Iterator[dict[str, Any]]:
    """Each measured offered load's figures, until one saturates."""
    for load in settings.load_steps():
        count = max(1, round(load * settings.step_seconds))
        task = progress.add_task(f"{label}: {load:,}/s", total=1)
        workers.ask("schedule", load, count)
        cpu0, t0 = tree_cpu_s(), time.perf_counter()
        answers = workers.ask("go", time.perf_counter() + _START_LEAD_S, load, count, True)
        cpu, elapsed = tree_cpu_s() - cpu0, time.perf_counter() - t0
        progress.remove_task(task)
        step = Step(load=load, records=count)
        parts: list[Step] = [a[1] for a in answers]
        for part in parts:
            step.validation.extend(part.validation)
            step.tamper.extend(part.tamper)
            step.errors += part.errors
        step.first_due = min(p.first_due for p in parts)
        step.last_ack = max(p.last_ack for p in parts)
        result = step_result(step, all(a[2] for a in answers), cpu, elapsed, idle_cores)
        report_step(progress, label, result)
        yield result
        if result["saturated"]:
            return


def _delay_links(
    cluster: Any,
    relays: RelayGroup,
    delay: LinkDelay,
    institutions: int,
    hosts: HostNetwork | None,
) -> list[tuple[str, ...]]:
    """Put a relay on every cross-institution NATS link; each institution's server URLs.

    Server *k* is institution *k*'s: its own node reaches it directly, every
    other one (and every other server's route) through a relay. With
    ``hosts``, server *k* runs in host *k*'s namespace on its address and the
    relays (in the bridge's namespace) listen on the bridge's address.
    Call before the cluster starts.
    """
    nodes = cluster.nodes
    if hosts is not None:
        for k, node in enumerate(nodes):
            host = hosts.host(_host_name(k))
            node.listen_host = host.address
            node.route_host = hosts.bridge_address
            node.command_prefix = tuple(hosts.command(host.name, []))
    relay_at = relays.listen_host
    route = [relays.add(n.listen_host, n.ports.cluster, delay) for n in nodes]
    client = [relays.add(n.listen_host, n.ports.client, delay) for n in nodes]
    for k, node in enumerate(nodes):
        node.peers = tuple(route[j] for j in range(len(nodes)) if j != k)
        node.cluster_advertise = f"{relay_at}:{route[k]}"
        node.client_advertise = f"{relay_at}:{client[k]}"
    scheme = "tls" if nodes[0].security is not None else "nats"
    return [
        tuple(
            node.client_url if k == i else f"{scheme}://{relay_at}:{client[k]}"
            for k, node in enumerate(nodes)
        )
        for i in range(institutions)
    ]


def _host_name(index: int) -> str:
    """Host *k*: institution *k*'s worker (if k < institutions), NATS server *k* (if k < 3)."""
    return f"site-{index}"


def network_layout(settings: HybridSettings) -> str:
    """How this run's institutions are apart (see the module docstring)."""
    if settings.rtt_ms is None:
        return LOOPBACK
    return NAMESPACES if unavailable_reason() is None else LOOPBACK_RELAY


def run_per_institution(
    root: Path, mode: str, ordering: str, settings: HybridSettings, progress: Progress
) -> dict[str, Any]:
    """One (mode, ordering) run with a process per institution; same result shape as in-process."""
    label = f"{mode}, {ordering}"
    if settings.rtt_ms is not None:
        label += f", {settings.rtt_ms:g} ms RTT"
    base = root / f"{mode}-{ordering}"
    if settings.rtt_ms is not None or settings.cpu_per_institution is not None:
        base = base.with_name(f"{base.name}-{settings.institutions}-{settings.rtt_ms}")
    roots = create_nodes(base, mode, settings.institutions, settings.anchor_interval())
    layout = network_layout(settings)
    with contextlib.ExitStack() as stack:
        relays = None
        hosts = None
        if settings.rtt_ms is not None:
            if ordering != "jetstream":
                raise WorkerFailed("a round trip between institutions needs the jetstream ordering")
            if layout == NAMESPACES:
                # Entered first, left last: its close kills whatever still runs inside.
                hosts = stack.enter_context(
                    HostNetwork(
                        [_host_name(k) for k in range(max(settings.institutions, _SERVERS))]
                    )
                )
                relays = stack.enter_context(
                    RelayGroup(
                        listen_host=hosts.bridge_address,
                        seed=settings.seed,
                        namespace=hosts.bridge_namespace,
                    )
                )
            else:
                relays = stack.enter_context(RelayGroup(seed=settings.seed))
        groups = None
        if settings.cpu_per_institution is not None:
            groups = stack.enter_context(
                CpuGroups(settings.institutions, settings.cpu_per_institution)
            )
        server_groups = None
        if settings.cpu_per_nats_server is not None and ordering == "jetstream":
            server_groups = stack.enter_context(CpuGroups(_SERVERS, settings.cpu_per_nats_server))
        result = _run(
            base,
            roots,
            label,
            mode,
            ordering,
            settings,
            progress,
            relays,
            CpuPlacement(groups, server_groups),
            hosts,
        )
        result["network_layout"] = layout
        return result
    raise AssertionError("unreachable")  # pragma: no cover - mypy: ExitStack may swallow


def _run(
    base: Path,
    roots: list[Path],
    label: str,
    mode: str,
    ordering: str,
    settings: HybridSettings,
    progress: Progress,
    relays: RelayGroup | None,
    placement: CpuPlacement,
    hosts: HostNetwork | None,
) -> dict[str, Any]:
    cluster: Any = None
    order_file = None
    urls: list[tuple[str, ...]] = [() for _ in roots]
    workers: _Workers | None = None
    finished = False
    try:
        if ordering == "solo":
            order_file = base / "order.db"
            create_order_file(order_file)
        else:
            from medledger.localnet.natsserver import NatsCluster

            cluster = NatsCluster(base / "nats", size=_SERVERS, start_timeout=_CLUSTER_START_S)
            if relays is not None:
                delay = LinkDelay.from_rtt(
                    settings.rtt_ms or 0.0, settings.jitter_ms, settings.loss_pct
                )
                urls = _delay_links(cluster, relays, delay, len(roots), hosts)
            else:
                urls = [tuple(cluster.client_urls()) for _ in roots]
            _start_cluster(cluster, hosts)
            if hosts is not None:
                _check_inside(hosts, "nats-server", [node.pid for node in cluster.nodes])
            placement.place_servers([node.pid for node in cluster.nodes], len(roots))
        task = progress.add_task(f"{label}: starting {len(roots)} institution processes", total=1)
        workers = _Workers(
            [
                _WorkerSpec(
                    root,
                    n,
                    mode,
                    ordering,
                    order_file,
                    urls[n],
                    settings,
                    None if hosts is None else hosts.host(_host_name(n)).namespace,
                )
                for n, root in enumerate(roots)
            ]
        )
        if placement.institutions is not None:
            for n, pid in enumerate(workers.pids()):
                placement.institutions.add(n, pid)
        workers.answers()  # every node open and in the consortium
        if hosts is not None:
            _check_inside(hosts, "institution worker", workers.pids())
        first = settings.loads[0] if settings.loads else settings.start_load
        workers.ask("schedule", first, settings.warmup)
        workers.ask("go", time.perf_counter() + _START_LEAD_S, first, settings.warmup, False)
        progress.remove_task(task)
        # Idle CPU (cut timers, anchoring checks, heartbeats), to report CPU net of it.
        cpu0, t0 = tree_cpu_s(), time.perf_counter()
        time.sleep(1.0 if settings.step_seconds >= 2 else 0.3)
        idle_cores = (tree_cpu_s() - cpu0) / (time.perf_counter() - t0)
        steps = list(_steps(workers, settings, progress, label, idle_cores))
        finished = True
    finally:
        if workers is not None:
            workers.close(abandon=not finished)
        if cluster is not None:
            cluster.stop()
    return run_result(mode, ordering, settings, idle_cores, steps)


@dataclass(frozen=True, slots=True)
class CpuPlacement:
    """The run's CPU groups: one per institution, and (optional) one per NATS server."""

    institutions: CpuGroups | None
    servers: CpuGroups | None

    def place_servers(self, pids: Sequence[int | None], institutions: int) -> None:
        """Server *k* joins its own group, else institution *k*'s (if it stands at one).

        A server left outside every group would run on CPU no institution pays
        for; one moved into the wrong group would tax its neighbour. Either is
        checked against the kernel's list before anything is measured.
        """
        for k, pid in enumerate(pids):
            if pid is None:
                continue
            if self.servers is not None:
                groups, index = self.servers, k
            elif self.institutions is not None and k < institutions:
                groups, index = self.institutions, k
            else:
                continue
            groups.add(index, pid)
            if pid not in groups.pids(index):
                raise WorkerFailed(f"nats-server {pid} is not in its CPU group {index}")


def _check_inside(hosts: HostNetwork, what: str, pids: Sequence[int | None]) -> None:
    """Refuse to measure unless process *k* of ``pids`` really is in host *k*'s namespace
    (the results then claim a layout that did not run)."""
    for k, pid in enumerate(pids):
        if pid is None or not hosts.holds(_host_name(k), pid):
            raise WorkerFailed(f"{what} {k} is not in its network namespace")


def _start_cluster(cluster: Any, hosts: HostNetwork | None) -> None:
    """Start the servers and create the consortium stream.

    With ``hosts`` the servers listen on the hosts' addresses, which the
    parent's own network does not reach: both steps then run in a thread of
    the parent that entered the bridge's namespace (the relays' namespace).
    """

    def start() -> None:
        cluster.start()
        asyncio.run(_create_stream(tuple(cluster.client_urls())))

    if hosts is None:
        start()
    else:
        call_in_namespace(hosts.bridge_namespace, start, timeout=2 * _CLUSTER_START_S)


async def _create_stream(urls: tuple[str, ...]) -> None:
    """Create the consortium stream once, so workers only connect to it."""
    from medledger.ledger.ordering.jetstream import JetStreamOrderer

    orderer = await JetStreamOrderer.connect(list(urls), stream=STREAM, subject=SUBJECT, replicas=3)
    await orderer.close()
