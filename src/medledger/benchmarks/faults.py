"""``medledger bench faults``: what crashes and a hung ordering server cost.

* **kills** — one ``medledger node start`` process (as an institution runs
  it) under ``writers`` concurrent HTTP clients, each creating Patients
  (``POST /fhir/Patient``) as fast as answers come back. The node is
  SIGKILLed ``kills`` times, each time once at least ``writes_per_round``
  new writes were acknowledged since it (re)started, and restarted at once.
  Writers keep going: a request in flight at a kill, or sent while the node
  is down, fails and is counted as *unacknowledged* (it may or may not have
  been stored — nobody was told it was). At the end every *acknowledged*
  write (201) is read back and compared with what was sent: **lost** (not
  found, or different) must be 0, and ``medledger verify`` must accept the
  private chain. Time to ready is from spawning the restarted process to
  ``/readyz`` answering 200 (and from the kill).
* **nats** — three consortium members (in this process) over a 3-node NATS
  JetStream cluster (R3), each connected to its own server first. One
  member's ``nats-server`` is SIGSTOPped — it hangs with its connections
  open, the hardest failure to notice — and a transaction is submitted
  through every member at once; the *stall* is the time until each is final
  at the member that submitted it. Then the server gets SIGCONT and the
  next one is stopped, ``nats_rounds`` times.

Results are figures, not pass/fail thresholds, except that a lost
acknowledged write or a chain that does not verify fails the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import uuid
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
    percentiles,
    results_header,
    work_dir,
    write_json,
)
from medledger.core.consortium import ConsortiumParams, Genesis, Member
from medledger.core.errors import MedledgerError
from medledger.core.keys import SigningKey
from medledger.core.models import Transaction
from medledger.core.transactions import ACCESS
from medledger.ledger.clock import SystemClock
from medledger.ledger.consortium.member import ConsortiumMember
from medledger.localnet.natsserver import free_ports
from medledger.localnet.nodeproc import NodeProcess, medledger_command
from medledger.node import init_node
from medledger.services.fhir import FHIR_JSON
from medledger.storage.sqlite.chain import SqliteChainStore
from medledger.storage.sqlite.tokens import SqliteTokenStore

__all__ = ["FaultSettings", "run_faults_bench"]

#: How long one round may take to reach its acknowledged writes before the run fails.
_ROUND_DEADLINE_S = 120.0
#: Pause of a writer after a failed request (the node is down): no busy loop meanwhile.
_RETRY_PAUSE_S = 0.05
_NATS_MEMBERS = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultSettings:
    kills: int = 10
    writers: int = 16
    writes_per_round: int = 200
    nats_rounds: int = 3
    #: Seconds a SIGSTOPped server may stall a submit before the run gives up on it.
    nats_timeout: float = 60.0

    @classmethod
    def quick(cls, base: FaultSettings) -> FaultSettings:
        return cls(
            kills=min(base.kills, 1),
            writers=min(base.writers, 4),
            writes_per_round=min(base.writes_per_round, 10),
            nats_rounds=min(base.nats_rounds, 1),
            nats_timeout=base.nats_timeout,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kills": self.kills,
            "writers": self.writers,
            "writes_per_round": self.writes_per_round,
            "nats_rounds": self.nats_rounds,
            "nats_timeout_s": self.nats_timeout,
        }


# -- SIGKILLs under concurrent writers --------------------------------------------------


def _patient(writer: int, n: int, tag: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:bench:faults", "value": f"{tag}-{writer}-{n}"}],
        "name": [{"family": f"Fault{writer}", "given": [f"W{n}"]}],
        "gender": "unknown",
    }


@dataclass(slots=True)
class _Ledger:
    """What the writers were told: acknowledged ``(id, identifier)`` pairs, and failures."""

    acked: list[tuple[str, str]]
    unacknowledged: int = 0
    refused: int = 0  # answered, but not 201: a failure the client was told about
    first_refusal: str = ""


class _KilledNode:
    """A node process that is SIGKILLed and restarted on the same port."""

    def __init__(self, root: Path) -> None:
        init_node(root, name="Bench Faults Hospital", passphrase=BENCH_PASSPHRASE, kdf=BENCH_KDF)
        tokens = SqliteTokenStore(root / "tokens.db")
        try:
            self.token, _ = tokens.create(
                role="clinician", now_ms=SystemClock().now_ms(), label="bench faults"
            )
        finally:
            tokens.close()
        self.root = root
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: NodeProcess | None = None

    def start(self) -> float:
        """Spawn the node and wait for ``/readyz``; return the seconds that took."""
        t = time.perf_counter()
        self.proc = NodeProcess(
            self.root, passphrase=BENCH_PASSPHRASE, port=self.port, ready_path="/readyz"
        )
        return time.perf_counter() - t

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


async def _writer(
    session: aiohttp.ClientSession, url: str, writer: int, tag: str, ledger: _Ledger, done: Any
) -> None:
    n = 0
    while not done.is_set():
        n += 1
        body = _patient(writer, n, tag)
        try:
            async with session.post(f"{url}/fhir/Patient", data=orjson.dumps(body)) as r:
                text = await r.read()
                status = r.status
        except (aiohttp.ClientError, TimeoutError, ConnectionError):
            ledger.unacknowledged += 1
            await asyncio.sleep(_RETRY_PAUSE_S)
            continue
        if status == 201:
            ledger.acked.append((orjson.loads(text)["id"], body["identifier"][0]["value"]))
        else:
            ledger.refused += 1
            ledger.first_refusal = ledger.first_refusal or f"{status}: {text[:200]!r}"
            await asyncio.sleep(_RETRY_PAUSE_S)


async def _read_back(
    session: aiohttp.ClientSession, url: str, acked: list[tuple[str, str]], concurrency: int
) -> list[str]:
    """Ids of acknowledged writes that cannot be read back as written."""
    lost: list[str] = []
    todo = iter(acked)

    async def reader() -> None:
        for rid, identifier in todo:
            async with session.get(f"{url}/fhir/Patient/{rid}") as r:
                if r.status != 200:
                    lost.append(rid)
                    continue
                doc = orjson.loads(await r.read())
            if doc.get("identifier", [{}])[0].get("value") != identifier:
                lost.append(rid)

    await asyncio.gather(*(reader() for _ in range(concurrency)))
    return lost


async def _kills(root: Path, settings: FaultSettings, console: Console) -> dict[str, Any]:
    node = _KilledNode(root)
    ledger = _Ledger(acked=[])
    tag = uuid.uuid4().hex[:8]
    ready_s: list[float] = []
    kill_to_ready_s: list[float] = []
    first_ready = await asyncio.to_thread(node.start)
    headers = {"Authorization": f"Bearer {node.token}", "Content-Type": FHIR_JSON}
    timeout = aiohttp.ClientTimeout(total=30)
    done = asyncio.Event()
    try:
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
            writers = [
                asyncio.create_task(_writer(session, node.url, w, tag, ledger, done))
                for w in range(settings.writers)
            ]
            try:
                for k in range(settings.kills):
                    target = len(ledger.acked) + settings.writes_per_round
                    deadline = time.monotonic() + _ROUND_DEADLINE_S
                    while len(ledger.acked) < target:
                        if time.monotonic() > deadline:
                            raise RuntimeError(
                                f"round {k + 1}: {len(ledger.acked)} of {target} writes "
                                f"acknowledged in {_ROUND_DEADLINE_S:.0f} s "
                                f"(first refusal: {ledger.first_refusal or 'none'})"
                            )
                        await asyncio.sleep(0.01)
                    killed_at = time.perf_counter()
                    node.kill()
                    ready = await asyncio.to_thread(node.start)
                    ready_s.append(ready)
                    kill_to_ready_s.append(time.perf_counter() - killed_at)
                    console.log(
                        f"kill {k + 1}/{settings.kills}: {len(ledger.acked)} acknowledged so far,"
                        f" ready again in {ready:.2f} s"
                    )
                # One more round after the last restart: the node takes writes again.
                target = len(ledger.acked) + settings.writes_per_round
                deadline = time.monotonic() + _ROUND_DEADLINE_S
                while len(ledger.acked) < target and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
            finally:
                done.set()
                await asyncio.gather(*writers)
            # Read back from the process started after the last kill: what it serves
            # is what the disk kept (the writes since then are read from it too).
            lost = await _read_back(session, node.url, ledger.acked, settings.writers)
    finally:
        await asyncio.to_thread(node.stop)
    verify = await asyncio.to_thread(
        subprocess.run,
        [*medledger_command(), "verify", "--dir", str(root)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MEDLEDGER_PASSPHRASE": BENCH_PASSPHRASE.decode()},
    )
    if lost:
        raise RuntimeError(f"{len(lost)} acknowledged writes were lost, e.g. Patient/{lost[0]}")
    if verify.returncode != 0:
        raise RuntimeError(f"the chain does not verify after the kills: {verify.stdout[-500:]}")
    return {
        "kills": settings.kills,
        "writers": settings.writers,
        "acknowledged": len(ledger.acked),
        "lost": len(lost),
        "unacknowledged_attempts": ledger.unacknowledged,
        "refused": ledger.refused,
        "chain_verified": True,
        "first_start_s": round(first_ready, 3),
        "restart_to_ready_ms": percentiles(ready_s),
        "kill_to_ready_ms": percentiles(kill_to_ready_s),
    }


# -- a hung NATS server -----------------------------------------------------------------


def _access_tx(genesis: Genesis, key: SigningKey, member: int, seq: int) -> Transaction:
    unsigned = Transaction(
        type=ACCESS,
        chain=genesis.chain_id,
        body={
            "reader": f"m{(member + 1) % _NATS_MEMBERS}",
            "holder": f"m{member}",
            "patient": f"{seq:064x}",
            "consent": "",
            "resource": f"{uuid.uuid4().hex:0>64}",
            "outcome": "allowed",
        },
        time_ms=SystemClock().now_ms(),
    )
    return unsigned.signed_by(key)


async def _nats(root: Path, settings: FaultSettings, console: Console) -> dict[str, Any]:
    from medledger.ledger.ordering.jetstream import JetStreamOrderer
    from medledger.localnet.natsserver import NatsCluster

    keys = [SigningKey.generate() for _ in range(_NATS_MEMBERS)]
    genesis = Genesis(
        consortium="faults",
        time_ms=SystemClock().now_ms(),
        members=tuple(
            Member(id=f"m{i}", name=f"member {i}", signing_key=k.public) for i, k in enumerate(keys)
        ),
        params=ConsortiumParams(cut_after_ms=5),
    )
    cluster = NatsCluster(root / "nats", size=_NATS_MEMBERS)
    await asyncio.to_thread(cluster.start)
    urls = cluster.client_urls()
    orderers: list[JetStreamOrderer] = []
    stores: list[SqliteChainStore] = []
    members: list[ConsortiumMember] = []
    rounds: list[dict[str, Any]] = []
    seq = 0
    try:
        for i, key in enumerate(keys):
            # Each member's own server first, as node start configures it.
            own_first = urls[i:] + urls[:i]
            orderer = await JetStreamOrderer.connect(
                own_first, stream="FAULTS", subject="faults.order", replicas=3, name=f"m{i}"
            )
            orderers.append(orderer)
            store = SqliteChainStore.create(root / f"m{i}.db", genesis.chain_id)
            stores.append(store)
            member = ConsortiumMember(
                genesis=genesis, member_id=f"m{i}", key=key, orderer=orderer, store=store
            )
            await member.start()
            members.append(member)

        async def final_s(i: int) -> float:
            nonlocal seq
            seq += 1
            t = time.perf_counter()
            await members[i].submit(
                _access_tx(genesis, keys[i], i, seq), timeout=settings.nats_timeout
            )
            return time.perf_counter() - t

        baseline = await asyncio.gather(*(final_s(i) for i in range(_NATS_MEMBERS)))
        for r in range(settings.nats_rounds):
            hung = r % _NATS_MEMBERS
            cluster.pause_node(hung)
            try:
                stalls = await asyncio.gather(*(final_s(i) for i in range(_NATS_MEMBERS)))
            finally:
                cluster.resume_node(hung)
            after = await asyncio.gather(*(final_s(i) for i in range(_NATS_MEMBERS)))
            rounds.append(
                {
                    "hung_server": hung,
                    "stall_ms_at_its_member": round(stalls[hung] * 1000, 1),
                    "stall_ms_at_other_members": round(
                        max(s for i, s in enumerate(stalls) if i != hung) * 1000, 1
                    ),
                    "final_ms_after_resume": round(max(after) * 1000, 1),
                }
            )
            console.log(
                f"hung nats-server {hung}: its member final after "
                f"{stalls[hung]:.2f} s, the others after "
                f"{max(s for i, s in enumerate(stalls) if i != hung):.2f} s"
            )
    finally:
        for member in members:
            await member.close()
        for orderer in orderers:
            with contextlib.suppress(MedledgerError):
                await orderer.close()
        for store in stores:
            store.close()
        await asyncio.to_thread(cluster.stop)
    return {
        "members": _NATS_MEMBERS,
        "replicas": 3,
        "baseline_final_ms": round(max(baseline) * 1000, 1),
        "rounds": rounds,
        "worst_stall_ms": max(
            max(r["stall_ms_at_its_member"], r["stall_ms_at_other_members"]) for r in rounds
        )
        if rounds
        else 0.0,
    }


# -- the run ------------------------------------------------------------------------------


def run_faults_bench(
    *, root: Path | None, settings: FaultSettings, json_out: Path | None, quick: bool
) -> dict[str, Any]:
    """SIGKILLs under writers, then a hung NATS server; print and return the figures."""
    if quick:
        settings = FaultSettings.quick(settings)
    console = Console(stderr=True)
    results = results_header(settings.to_json(), quick)
    started = time.perf_counter()
    with work_dir(root, "faults") as base:
        results["kills"] = asyncio.run(_kills(base / "node", settings, console))
        if settings.nats_rounds:
            results["nats"] = asyncio.run(_nats(base, settings, console))
    finish_results(results, started)
    _print(results)
    if json_out is not None:
        write_json(json_out, results)
    return results


def _print(results: dict[str, Any]) -> None:
    kills = results["kills"]
    t = Table(title="medledger bench faults")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("SIGKILLs under writers", str(kills["kills"]))
    t.add_row("writes acknowledged / lost", f"{kills['acknowledged']:,} / {kills['lost']}")
    t.add_row("unacknowledged attempts", f"{kills['unacknowledged_attempts']:,}")
    t.add_row("chain verifies after the kills", "yes" if kills["chain_verified"] else "NO")
    r = kills["restart_to_ready_ms"]
    t.add_row("restart to /readyz (p50 / max)", f"{r['p50']:,.0f} / {r['max']:,.0f} ms")
    nats = results.get("nats")
    if nats:
        t.add_row("consortium final, no fault", f"{nats['baseline_final_ms']:,} ms")
        for rnd in nats["rounds"]:
            t.add_row(
                f"hung nats-server {rnd['hung_server']}: stall at its member / others",
                f"{rnd['stall_ms_at_its_member']:,} / {rnd['stall_ms_at_other_members']:,} ms",
            )
    Console().print(t)
