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
address, so neither route gossip nor client discovery can bypass it. With
``cpu_per_institution`` each institution's worker, and its NATS server, run
in a cgroup of their own with that quota (``localnet.cgroups``); the
parent, which only coordinates, and the relay thread in it stay outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
import traceback
from collections.abc import Iterator
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
from medledger.heap import freeze_startup_heap
from medledger.ledger.ordering.port import Orderer
from medledger.localnet.cgroups import CpuGroups
from medledger.localnet.netproc import create_order_file
from medledger.localnet.relay import LinkDelay, RelayGroup
from medledger.synthetic import iter_patients

__all__ = ["run_per_institution"]

#: The consortium stream and subject every node uses by default.
STREAM, SUBJECT = ConsortiumConfig().stream, ConsortiumConfig().subject
#: Longest wait for a worker's answer (a step drains for up to 120 s).
_ANSWER_TIMEOUT_S = 300.0
#: Lead time between the start message and the shared start instant.
_START_LEAD_S = 0.1


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


# -- the worker (one institution) ------------------------------------------------------


def _worker_main(spec: _WorkerSpec, conn: Connection) -> None:
    try:
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
    freeze_startup_heap()  # as ``node start`` does once it is open
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
    cluster: Any, relays: RelayGroup, delay: LinkDelay, institutions: int
) -> list[tuple[str, ...]]:
    """Put a relay on every cross-institution NATS link; each institution's server URLs.

    Server *k* is institution *k*'s: its own node reaches it directly, every
    other one (and every other server's route) through a relay. Call before
    the cluster starts.
    """
    from medledger.localnet.natsserver import HOST

    nodes = cluster.nodes
    route = [relays.add(HOST, n.ports.cluster, delay) for n in nodes]
    client = [relays.add(HOST, n.ports.client, delay) for n in nodes]
    for k, node in enumerate(nodes):
        node.peers = tuple(route[j] for j in range(len(nodes)) if j != k)
        node.cluster_advertise = f"{HOST}:{route[k]}"
        node.client_advertise = f"{HOST}:{client[k]}"
    return [
        tuple(
            node.client_url if k == i else f"{node.client_url.rsplit(':', 1)[0]}:{client[k]}"
            for k, node in enumerate(nodes)
        )
        for i in range(institutions)
    ]


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
    with contextlib.ExitStack() as stack:
        relays = None
        if settings.rtt_ms is not None:
            if ordering != "jetstream":
                raise WorkerFailed("a round trip between institutions needs the jetstream ordering")
            relays = stack.enter_context(RelayGroup(seed=settings.seed))
        groups = None
        if settings.cpu_per_institution is not None:
            groups = stack.enter_context(
                CpuGroups(settings.institutions, settings.cpu_per_institution)
            )
        return _run(base, roots, label, mode, ordering, settings, progress, relays, groups)
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
    groups: CpuGroups | None,
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

            cluster = NatsCluster(base / "nats", size=3, start_timeout=60.0)
            if relays is not None:
                delay = LinkDelay.from_rtt(
                    settings.rtt_ms or 0.0, settings.jitter_ms, settings.loss_pct
                )
                urls = _delay_links(cluster, relays, delay, len(roots))
            else:
                urls = [tuple(cluster.client_urls()) for _ in roots]
            cluster.start()
            if groups is not None:
                for k, node in enumerate(cluster.nodes[: len(roots)]):
                    if node.pid is not None:
                        groups.add(k, node.pid)
            asyncio.run(_create_stream(tuple(cluster.client_urls())))
        task = progress.add_task(f"{label}: starting {len(roots)} institution processes", total=1)
        workers = _Workers(
            [
                _WorkerSpec(root, n, mode, ordering, order_file, urls[n], settings)
                for n, root in enumerate(roots)
            ]
        )
        if groups is not None:
            for n, pid in enumerate(workers.pids()):
                groups.add(n, pid)
        workers.answers()  # every node open and in the consortium
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


async def _create_stream(urls: tuple[str, ...]) -> None:
    """Create the consortium stream once, so workers only connect to it."""
    from medledger.ledger.ordering.jetstream import JetStreamOrderer

    orderer = await JetStreamOrderer.connect(list(urls), stream=STREAM, subject=SUBJECT, replicas=3)
    await orderer.close()
