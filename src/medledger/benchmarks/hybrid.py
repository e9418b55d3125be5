"""``medledger bench hybrid``: the paper's claim, measured — hybrid vs consortium-only.

Same workload in both modes: synthetic patients (``synthetic``,
fixed seed) written as FHIR resources by concurrent writers at each of 4
institutions, ordered by ``solo`` or a real 3-node JetStream R3 cluster, at
offered loads from 100 records/s doubling up to the saturation point. Each
institution runs in its own process, as institutions do
(``hybrid_procs``); ``one_process`` puts them all in this one
(``network.LocalNetwork``). Same records service, encryption and storage;
only the commit path differs:

* **hybrid** — ``record.put`` commits on the institution's private chain;
  every institution anchors its chain on the consortium every 200 ms.
* **consortium-only** — the genesis says ``mode = "consortium-only"``; every
  ``record.put`` is signed by its institution and ordered and finalized by
  the consortium (``benchmarks.consortium_only``); nothing is anchored.

Measured per offered load (open loop: record *k* is due at ``t0 + k/load``,
taken by the next free writer of its institution; latency counts from the
due time, so a saturated system cannot hide its queue):

(a) **validation delay** — due → the write returns: a durable, signed,
    verifiable commit the writer can rely on (private block / final
    consortium block);
(b) **global tamper-evidence delay** — due → covered by a final consortium
    anchor at the writer's member (hybrid: the first final anchor whose
    ``log_size`` reaches the private head at the ack, a slightly
    conservative bound) or the final block itself (consortium-only: equal
    to (a));
(c) **achieved throughput** — records / (last ack - first due); a load is
    saturated when it achieves less than 80% of what was offered, and the
    saturation throughput is the best achieved at any load;
(d) **CPU per record** — CPU time of this process and its children (the
    institution processes and nats-servers) over the step, per record; also
    net of the idle rate measured before the first step (timers, heartbeats).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from medledger.benchmarks.common import (
    percentiles,
)
from medledger.benchmarks.consortium_only import ConsortiumCommit
from medledger.config import institution_id
from medledger.core.consortium import CONSORTIUM_ONLY, HYBRID, ConsortiumParams
from medledger.core.errors import InvalidInput, MedledgerError
from medledger.ledger.clock import SystemClock
from medledger.localnet.network import LocalNetwork
from medledger.node import Node, init_node, write_genesis
from medledger.services.keys import InstitutionKeys
from medledger.services.records.service import RecordsService
from medledger.storage import factory
from medledger.storage.keystore import KdfParams
from medledger.synthetic import iter_patients

__all__ = [
    "MODES",
    "PASSPHRASE",
    "BenchNetwork",
    "draw_plots",
    "HybridSettings",
    "Step",
    "create_nodes",
    "offer",
    "report_step",
    "run_one_process",
    "run_result",
    "schedule",
    "step_result",
    "tree_cpu_s",
    "workload",
]

MODES = (HYBRID, CONSORTIUM_ONLY)
PASSPHRASE = b"bench-only-passphrase"
#: A load achieving less than this share of what was offered is saturated.
_SATURATED = 0.8
#: Quantiles kept per step for the CDF plots (0, 1, …, 100 %).
_CDF_POINTS = 101
#: How early a writer wakes for its record: the event loop's timer resolution (1 ms)
#: and a sleeping thread's wake-up on a virtual machine (up to a few tenths of one).
_TIMER_SLACK_S = 0.002


@dataclass(frozen=True, slots=True, kw_only=True)
class HybridSettings:
    """What ``bench hybrid`` runs; defaults are the documented profile."""

    institutions: int = 4
    orderings: tuple[str, ...] = ("jetstream", "solo")
    modes: tuple[str, ...] = MODES
    loads: tuple[int, ...] = ()  # explicit offered loads; empty = start_load doubling
    start_load: int = 100
    max_load: int = 3_200
    step_seconds: float = 5.0
    writers: int = 64  # per institution
    warmup: int = 200  # records written before the first measured step
    seed: int = 11
    per_patient: int = 20
    #: All institutions in this process, instead of one process per institution.
    one_process: bool = False
    #: Round trip between institutions through the delaying relay (``None``: plain loopback).
    rtt_ms: float | None = None
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    #: Each institution's processes in a cgroup limited to this many cores (``None``: no limit).
    cpu_per_institution: float | None = None
    #: Each NATS server in a cgroup of its own limited to this many cores, apart from the
    #: institutions' groups (``None``: a server shares its institution's group, as when it
    #: runs on that institution's machine). Separates the ordering service's CPU from the
    #: members' when the consortium grows.
    cpu_per_nats_server: float | None = None
    #: The genesis anchor interval, or, with ``anchor_interval_scales``, the interval
    #: per institution (interval = this times the institutions): each member checks N anchors
    #: and N votes per interval, so a growing consortium on fixed CPU per institution
    #: keeps its per-member consortium work constant only with a growing interval.
    anchor_interval_ms: int = ConsortiumParams().anchor_interval_ms
    anchor_interval_scales: bool = False

    @classmethod
    def quick(cls, base: HybridSettings) -> HybridSettings:
        """A smoke run in seconds: two small loads, short steps."""
        return HybridSettings(
            institutions=base.institutions,
            orderings=base.orderings,
            modes=base.modes,
            loads=base.loads[:2] or (50, 100),
            step_seconds=min(base.step_seconds, 1.0),
            writers=min(base.writers, 16),
            warmup=min(base.warmup, 20),
            seed=base.seed,
            per_patient=min(base.per_patient, 10),
            one_process=base.one_process,
            rtt_ms=base.rtt_ms,
            jitter_ms=base.jitter_ms,
            loss_pct=base.loss_pct,
            cpu_per_institution=base.cpu_per_institution,
            cpu_per_nats_server=base.cpu_per_nats_server,
            anchor_interval_ms=base.anchor_interval_ms,
            anchor_interval_scales=base.anchor_interval_scales,
        )

    def anchor_interval(self) -> int:
        """The anchor interval of this run's genesis, in ms."""
        if self.anchor_interval_scales:
            return self.anchor_interval_ms * self.institutions
        return self.anchor_interval_ms

    def load_steps(self) -> Iterator[int]:
        if self.loads:
            yield from self.loads
            return
        load = self.start_load
        while load <= self.max_load:
            yield load
            load *= 2

    def to_json(self) -> dict[str, Any]:
        scale: dict[str, Any] = {}
        if self.rtt_ms is not None:
            scale["link"] = {
                "rtt_ms": self.rtt_ms,
                "jitter_ms": self.jitter_ms,
                "loss_pct": self.loss_pct,
            }
        if self.cpu_per_institution is not None:
            scale["cpu_per_institution"] = self.cpu_per_institution
        if self.cpu_per_nats_server is not None:
            scale["cpu_per_nats_server"] = self.cpu_per_nats_server
        return scale | {
            "institutions": self.institutions,
            "orderings": list(self.orderings),
            "modes": list(self.modes),
            "loads": list(self.load_steps()),
            "step_seconds": self.step_seconds,
            "writers_per_institution": self.writers,
            "warmup_records": self.warmup,
            "seed": self.seed,
            "resources_per_patient": self.per_patient,
            "layout": "one process" if self.one_process else "one process per institution",
            "saturated_below": _SATURATED,
            "anchor_interval_per_institution": self.anchor_interval_scales,
            "consortium_params": genesis_params(HYBRID, self.anchor_interval()).to_json(),
            "consortium_only_params": genesis_params(CONSORTIUM_ONLY).to_json(),
        }


def genesis_params(mode: str, anchor_interval_ms: int | None = None) -> ConsortiumParams:
    """The benchmark consortium's genesis parameters in ``mode``."""
    interval = anchor_interval_ms or ConsortiumParams().anchor_interval_ms
    if mode == HYBRID:
        # As deployed (the genesis defaults): anchors every institution sends at the
        # same multiple of the interval (ledger.anchoring) share one block, cut when
        # the round is complete (decision 0053) or 20 ms after its first tx.
        return ConsortiumParams(max_block_txs=500, anchor_interval_ms=interval, mode=mode)
    # Each record is a consortium tx: bench consortium's 5 ms time-to-cut, its
    # lowest latency. Nothing is anchored.
    return ConsortiumParams(max_block_txs=500, cut_after_ms=5, mode=mode)


# -- CPU accounting --------------------------------------------------------------------


def _children_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid``'s live child processes (the nats-servers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def tree_cpu_s() -> float:
    """CPU seconds used so far by this process (all threads) and its children."""
    own = time.process_time()
    if not Path("/proc/self/stat").exists():
        return own
    return own + _children_cpu_s(os.getpid())


# -- the workload ----------------------------------------------------------------------


def workload(settings: HybridSettings) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(institution index, resource)`` forever, patient by patient, interleaved.

    Patient *k* belongs to institution ``k mod n``; each patient's resources
    stay in their dependency order. The same seed gives every run the same
    records in the same order.
    """
    n = settings.institutions
    start = 0
    while True:
        bundles = list(
            iter_patients(
                n * 8,
                seed=settings.seed,
                start_index=start,
                resources_per_patient=settings.per_patient,
            )
        )
        start += len(bundles)
        streams = [
            deque([b.patient, *b.resources]) for b in bundles
        ]  # one per patient, k mod n = institution
        while any(streams):
            for k, stream in enumerate(streams):
                if stream:
                    yield k % n, stream.popleft()


def create_nodes(
    base: Path, mode: str, n: int, anchor_interval_ms: int | None = None
) -> list[Path]:
    """``n`` institution nodes under ``base`` and a genesis for ``mode`` naming them all."""
    base.mkdir(parents=True)
    roots = []
    for i in range(n):
        name = f"Hospital {chr(ord('A') + i)}"
        root = base / institution_id(name)
        init_node(root, name=name, passphrase=PASSPHRASE, kdf=KdfParams(n=2**12))
        roots.append(root)
    params = genesis_params(mode, anchor_interval_ms)
    write_genesis(f"bench-{mode}", roots, time_ms=SystemClock().now_ms(), params=params)
    return roots


@dataclass(slots=True)
class Step:
    load: int
    records: int
    validation: list[float] = field(default_factory=list)
    tamper: list[float] = field(default_factory=list)
    errors: int = 0
    first_due: float = 0.0
    last_ack: float = 0.0


class BenchNetwork:
    """One network in one mode: nodes, their records services, anchor watchers."""

    def __init__(self, net: LocalNetwork, mode: str, services: list[RecordsService]) -> None:
        self.net = net
        self.mode = mode
        self.nodes: list[Node] = list(net.nodes.values())
        self.services = services
        # Hybrid: per institution, a heap of (private log size to cover, issued, step).
        self._pending: list[list[tuple[int, float, int, Step]]] = [[] for _ in self.nodes]
        self._seq = 0
        self._watchers: list[asyncio.Task[None]] = []
        self._closing = False
        self._extra_closers: list[Any] = []

    @classmethod
    async def open(
        cls, base: Path, mode: str, ordering: str, n: int, anchor_interval_ms: int | None = None
    ) -> BenchNetwork:
        """All ``n`` institutions in this process (the ``--one-process`` layout)."""
        create_nodes(base, mode, n, anchor_interval_ms)
        net = await LocalNetwork.open(
            base, passphrase=PASSPHRASE, ordering=ordering, anchor=mode == HYBRID
        )
        try:
            return cls.over(net, mode)
        except BaseException:
            await net.close()
            raise

    @classmethod
    def over(cls, net: LocalNetwork, mode: str) -> BenchNetwork:
        """Write through ``net``'s nodes in ``mode`` (call on the running event loop)."""
        bench = cls(net, mode, [])
        for node in bench.nodes:
            bench.services.append(
                node.records if mode == HYBRID else bench._consortium_records(node)
            )
        if mode == HYBRID:
            bench._watchers = [
                asyncio.create_task(bench._watch(i)) for i in range(len(bench.nodes))
            ]
        return bench

    def _consortium_records(self, node: Node) -> RecordsService:
        """The node's records service with the consortium as its commit path (same storage)."""
        if node.consortium is None or node.consortium_store is None:
            raise InvalidInput("the node has not joined the consortium")
        if node.config.storage.blobs != "file":
            raise InvalidInput("bench hybrid runs on the embedded file blob store")
        commit = ConsortiumCommit(
            node.consortium, node.keystore.signing_key(), node.consortium_store
        )
        blobs = factory.open_blob_store("file", node.paths.blobs)
        self._extra_closers.append(blobs)
        return RecordsService(
            institution=node.config.institution,
            chain=commit,
            index=node.index,
            blobs=blobs,
            keys=InstitutionKeys(node.keystore),
            sign_tx=commit.sign,
            # The node's own service recovers this index against the private chain.
            crash_recovery=False,
        )

    async def write(
        self, i: int, resource: dict[str, Any], issued: float, step: Step | None
    ) -> None:
        """Write one record; its delays are counted from ``issued`` (see :func:`offer`)."""
        try:
            await self.services[i].update(
                str(resource["resourceType"]), str(resource["id"]), resource
            )
        except MedledgerError:
            if step is not None:
                step.errors += 1
            return
        now = time.perf_counter()
        if step is None:
            return
        step.validation.append(now - issued)
        step.last_ack = max(step.last_ack, now)
        if self.mode != HYBRID:
            step.tamper.append(now - issued)  # the final block is the tamper evidence
            return
        node = self.nodes[i]
        target = node.chain.head.log_size
        if self._anchored(i) >= target:
            step.tamper.append(now - issued)
            return
        self._seq += 1
        heapq.heappush(self._pending[i], (target, issued, self._seq, step))

    def _anchored(self, i: int) -> int:
        node = self.nodes[i]
        assert node.consortium is not None
        anchor = node.consortium.state.anchors.get(node.config.institution)
        return anchor.log_size if anchor is not None else 0

    async def _watch(self, i: int) -> None:
        """Stamp records of institution ``i`` as tamper-evident when a final anchor covers them."""
        member = self.nodes[i].consortium
        assert member is not None
        pending = self._pending[i]
        # A flag as well as cancel(): asyncio.wait_for (3.11) can swallow a cancellation
        # that arrives as its own timeout fires, and this loop would then never end.
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await member.wait_final(member.final_height + 1, timeout=0.5)
            covered = self._anchored(i)
            now = time.perf_counter()
            while pending and pending[0][0] <= covered:
                _, issued, _, step = heapq.heappop(pending)
                step.tamper.append(now - issued)

    async def drained(self, timeout: float) -> bool:
        """Wait until every acknowledged record is tamper-evident (hybrid)."""
        deadline = time.perf_counter() + timeout
        while any(self._pending) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        return not any(self._pending)

    async def close(self) -> None:
        self._closing = True
        for task in self._watchers:
            task.cancel()
        for task in self._watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.mode != HYBRID:
            for service in self.services:
                await service.close()
        await self.net.close()
        for closer in self._extra_closers:
            close = getattr(closer, "close", None)
            if close is not None:
                close()


Schedule = list[deque[tuple[float, dict[str, Any]]]]


def schedule(
    work: Iterator[tuple[int, dict[str, Any]]],
    load: int,
    count: int,
    institutions: int,
    only: int | None = None,
) -> Schedule:
    """The next ``count`` records at ``load``/s: per institution, (seconds after start, resource).

    With ``only``, the one queue holds institution ``only``'s records; the
    others are drawn and dropped, so every process walks the same workload.
    """
    queues: Schedule = [deque() for _ in range(1 if only is not None else institutions)]
    for k in range(count):
        i, resource = next(work)
        if only is None:
            queues[i].append((k / load, resource))
        elif i == only:
            queues[0].append((k / load, resource))
    return queues


async def offer(
    bench: BenchNetwork,
    queues: Schedule,
    start: float,
    writers: int,
    step: Step | None,
    advance: Any,
) -> None:
    """Write each queued record at ``start`` + its offset; ``writers`` per institution.

    ``start`` is a ``time.perf_counter()`` value: on Linux that is the
    system-wide monotonic clock, so processes can share one start.

    A record is timed from when it was issued or due, whichever came first.
    The event loop rounds a sleep up to the next whole millisecond (epoll's
    timeout), which would count up to 1 ms of the benchmark's own timer as
    the system's delay (half a millisecond on average, a tenth of a hybrid
    write). So a writer wakes up to :data:`_TIMER_SLACK_S` early and is timed
    from its issue; one that wakes late, because the loop was busy with other
    work, is still timed from when its record was due.
    """
    if step is not None:
        step.first_due = start

    async def writer(i: int) -> None:
        queue = queues[i]
        while queue:
            offset, resource = queue.popleft()
            due = start + offset
            delay = due - time.perf_counter() - _TIMER_SLACK_S
            if delay > 0:
                await asyncio.sleep(delay)
            await bench.write(i, resource, min(due, time.perf_counter()), step)
            advance()

    await asyncio.gather(*(writer(i) for i in range(len(queues)) for _ in range(writers)))


async def _offer(
    bench: BenchNetwork,
    work: Iterator[tuple[int, dict[str, Any]]],
    load: int,
    count: int,
    writers: int,
    step: Step | None,
    advance: Any,
) -> None:
    """Offer ``count`` records at ``load`` per second to this process's institutions."""
    queues = schedule(work, load, count, len(bench.nodes))
    await offer(bench, queues, time.perf_counter() + 0.05, writers, step, advance)


def step_result(
    step: Step, drained: bool, cpu: float, elapsed: float, idle_cores: float
) -> dict[str, Any]:
    """One offered load's figures; ``cpu`` seconds were used over ``elapsed``."""
    done = len(step.validation)
    achieved = done / max(step.last_ack - step.first_due, 1e-9) if done else 0.0
    return {
        "offered_per_s": step.load,
        "records": step.records,
        "acked": done,
        "errors": step.errors,
        "achieved_per_s": round(achieved, 1),
        "saturated": achieved < _SATURATED * step.load,
        "validation_ms": percentiles(step.validation),
        "tamper_evidence_ms": percentiles(step.tamper),
        "all_tamper_evident": drained and len(step.tamper) == done,
        "cpu_ms_per_record": round(cpu / max(done, 1) * 1000, 3),
        "cpu_ms_per_record_net": round(
            max(cpu - idle_cores * elapsed, 0.0) / max(done, 1) * 1000, 3
        ),
        "cpu_cores_used": round(cpu / elapsed, 2),
        "cdf_ms": {"validation": _cdf(step.validation), "tamper": _cdf(step.tamper)},
    }


def report_step(progress: Progress, label: str, result: dict[str, Any]) -> None:
    progress.console.print(
        f"{label}: {result['offered_per_s']:,}/s offered → {result['achieved_per_s']:,.0f}/s,"
        f" validation p50 {result['validation_ms']['p50']} ms, tamper-evident p99"
        f" {result['tamper_evidence_ms']['p99']} ms"
        + (" [saturated]" if result["saturated"] else "")
    )


def _cdf(samples: list[float]) -> list[float]:
    """``_CDF_POINTS`` quantiles (0 … 100 %) in milliseconds."""
    if not samples:
        return []
    ordered = sorted(samples)
    n = len(ordered)
    return [
        round(ordered[min(n - 1, round(q * (n - 1) / (_CDF_POINTS - 1)))] * 1000, 3)
        for q in range(_CDF_POINTS)
    ]


async def run_one_process(
    root: Path, mode: str, ordering: str, settings: HybridSettings, progress: Progress
) -> dict[str, Any]:
    """One (mode, ordering) run with every institution in this process."""
    label = f"{mode}, {ordering}"
    bench = await BenchNetwork.open(
        root / f"{mode}-{ordering}",
        mode,
        ordering,
        settings.institutions,
        settings.anchor_interval(),
    )
    steps: list[dict[str, Any]] = []
    try:
        work = workload(settings)
        task = progress.add_task(f"{label}: warm-up", total=settings.warmup)
        await _offer(
            bench,
            work,
            settings.start_load if not settings.loads else settings.loads[0],
            settings.warmup,
            settings.writers,
            None,
            lambda: progress.advance(task),
        )
        await bench.drained(30)
        # Idle CPU (cut timers, anchoring checks, heartbeats), to report CPU net of it.
        cpu0, t0 = tree_cpu_s(), time.perf_counter()
        await asyncio.sleep(1.0 if settings.step_seconds >= 2 else 0.3)
        idle_cores = (tree_cpu_s() - cpu0) / (time.perf_counter() - t0)
        progress.remove_task(task)
        for load in settings.load_steps():
            count = max(1, round(load * settings.step_seconds))
            step = Step(load=load, records=count)
            task = progress.add_task(f"{label}: {load:,}/s", total=count)
            cpu0, t0 = tree_cpu_s(), time.perf_counter()
            await _offer(
                bench, work, load, count, settings.writers, step, lambda t=task: progress.advance(t)
            )
            drained = await bench.drained(120)
            cpu, elapsed = tree_cpu_s() - cpu0, time.perf_counter() - t0
            progress.remove_task(task)
            steps.append(step_result(step, drained, cpu, elapsed, idle_cores))
            report_step(progress, label, steps[-1])
            if steps[-1]["saturated"]:
                break
    finally:
        await bench.close()
    return run_result(mode, ordering, settings, idle_cores, steps)


def run_result(
    mode: str,
    ordering: str,
    settings: HybridSettings,
    idle_cores: float,
    steps: list[dict[str, Any]],
) -> dict[str, Any]:
    """One (mode, ordering) run's figures, from its steps."""
    return {
        "mode": mode,
        "ordering": ordering,
        "institutions": settings.institutions,
        "idle_cpu_cores": round(idle_cores, 3),
        "steps": steps,
        "saturation_per_s": max((s["achieved_per_s"] for s in steps), default=0.0),
        "saturated": any(s["saturated"] for s in steps),
        "rtt_ms": settings.rtt_ms,
        "cpu_per_institution": settings.cpu_per_institution,
        "cpu_per_nats_server": settings.cpu_per_nats_server,
        "anchor_interval_ms": settings.anchor_interval() if mode == HYBRID else None,
    }


def draw_plots(results: dict[str, Any], plots_dir: Path, console: Console) -> list[str]:
    """The hybrid figures' paths; without matplotlib (an optional extra) one line and none."""
    from medledger.benchmarks.report import PLOTS_SKIPPED, plot_hybrid, plots_available

    if not plots_available():
        console.print(PLOTS_SKIPPED, markup=False, highlight=False)
        return []
    return [str(p) for p in plot_hybrid(results, plots_dir)]
