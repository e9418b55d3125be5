"""Fault injection on real nats-server processes: a hung server, a restarted member.

Four consortium members on a 3-node NATS cluster (R3 stream). Members h0 and
h1 prefer node n0, h2 prefers n1, h3 prefers n2; a quorum is 3 of 4, so while
n0 hangs the consortium finalizes only if h0 or h1 leave it.

* n0 is SIGSTOPped (it keeps its connections open and answers nothing) for
  longer than the orderers' ``retry_for`` and the reader's missed-heartbeat
  limit. The members detect the hang from unanswered pings (1 s pings, 1
  outstanding: about 2 s), fail over, keep following and keep finalizing;
  after SIGCONT everything goes on, with one chain everywhere.
* The stall — from SIGSTOP to h0's next final block — is measured and
  printed (``-s`` shows it) for the fault benchmark.
* h3 is then restarted over its store: replaying the stream it publishes no
  vote for a height it already holds. The stream's de-duplication window is
  1 s here, so a repeated vote would be stored and seen.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from medledger.core.consortium import ConsortiumParams, Genesis, Member
from medledger.core.encoding import parse_canonical
from medledger.core.errors import MedledgerError, OrderingError
from medledger.core.hashing import sha256
from medledger.core.keys import SigningKey
from medledger.core.models import BlockHeader, Receipt, Signature, Transaction
from medledger.ledger.clock import SystemClock
from medledger.ledger.consortium.member import ConsortiumMember
from medledger.ledger.ordering.jetstream import JetStreamOrderer, JetStreamTuning
from medledger.localnet.natsserver import NatsCluster
from medledger.storage.sqlite.chain import SqliteChainStore

MEMBERS = ("h0", "h1", "h2", "h3")
PREFERRED_NODE = {"h0": 0, "h1": 0, "h2": 1, "h3": 2}
HUNG_NODE = 0
#: Detect a hung server in about 2 s; retry_for is the old reader's give-up limit.
TUNING = JetStreamTuning(ping_interval=1, max_outstanding_pings=1, read_backoff_max=1.0)
RETRY_FOR = 3.0
#: How long n0 stays stopped: beyond retry_for and the 3 s heartbeat limit.
HANG_S = 8.0
#: Bound of every wait (a loaded machine can take a while to elect new NATS leaders).
WAIT_S = 45.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    nats = NatsCluster(tmp_path / "nats", size=3)
    nats.start()
    try:
        yield nats
    finally:
        nats.resume_node(HUNG_NODE)  # never leave a stopped process behind
        nats.stop()


class Consortium:
    """Four members, each with its own NATS connection and SQLite chain store."""

    def __init__(self, directory: Path, cluster: NatsCluster) -> None:
        self.directory = directory
        self.cluster = cluster
        self.stream = f"FAULT_{uuid.uuid4().hex[:10]}"
        self.keys = {mid: SigningKey.generate() for mid in MEMBERS}
        self.genesis = Genesis(
            consortium="faults",
            time_ms=SystemClock().now_ms() - 1000,
            members=tuple(
                Member(id=mid, name=f"Hospital {mid}", signing_key=key.public)
                for mid, key in self.keys.items()
            ),
            params=ConsortiumParams(cut_after_ms=20),
        )
        self.members: dict[str, ConsortiumMember] = {}
        self.orderers: dict[str, JetStreamOrderer] = {}
        self.stores: list[SqliteChainStore] = []
        self._n = 0

    async def connect(self, mid: str) -> JetStreamOrderer:
        urls = self.cluster.client_urls()
        own = PREFERRED_NODE[mid]
        return await JetStreamOrderer.connect(
            urls[own:] + urls[:own],  # own server first
            stream=self.stream,
            subject=f"faults.{self.stream.lower()}",
            replicas=3,
            duplicate_window=1.0,
            retry_for=RETRY_FOR,
            tuning=TUNING,
            name=mid,
        )

    async def start(self, mid: str) -> ConsortiumMember:
        path = self.directory / f"{mid}.db"
        if path.exists():
            store = SqliteChainStore.open(path)
        else:
            store = SqliteChainStore.create(path, self.genesis.chain_id)
        self.stores.append(store)
        orderer = await self.connect(mid)
        member = ConsortiumMember(
            genesis=self.genesis, member_id=mid, key=self.keys[mid], orderer=orderer, store=store
        )
        await member.start()
        self.members[mid], self.orderers[mid] = member, orderer
        return member

    async def stop(self, mid: str) -> None:
        await self.members.pop(mid).close()
        await self.orderers.pop(mid).close()

    def access(self, holder: str) -> Transaction:
        self._n += 1
        unsigned = Transaction(
            type="access",
            chain=self.genesis.chain_id,
            body={
                "reader": holder,
                "holder": holder,
                "patient": sha256(f"patient-{self._n}".encode()).hex(),
                "consent": "",
                "resource": f"Observation/{self._n}",
                "outcome": "allowed",
            },
            time_ms=SystemClock().now_ms(),
        )
        return unsigned.signed_by(self.keys[holder])

    async def close(self) -> None:
        for mid in list(self.members):
            await self.stop(mid)
        for store in self.stores:
            store.close()

    def describe(self) -> str:
        """Each member's final height, NATS server and problems (for failure messages)."""
        parts = []
        for mid, member in self.members.items():
            url = self.orderers[mid]._nc.connected_url
            server = url.netloc if url is not None else "none"
            parts.append(
                f"{mid}: final {member.final_height} via {server} {member.status()['problems']}"
            )
        return "; ".join(parts)


async def _until(pred: Any, what: str, net: Consortium, timeout: float = WAIT_S) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {net.describe()}")
        await asyncio.sleep(0.01)


async def _votes_after(orderer: JetStreamOrderer, after: int) -> list[tuple[BlockHeader, str]]:
    """Every vote stored after sequence ``after``: (header, signer fingerprint)."""
    last = await orderer.last_seq()
    votes: list[tuple[BlockHeader, str]] = []
    if last <= after:
        return votes
    reader = orderer.read(after + 1)
    try:
        async for msg in reader:
            try:
                doc = parse_canonical(msg.payload)
            except MedledgerError:
                doc = None
            if isinstance(doc, dict) and doc.get("kind") == "vote":
                signer = Signature.from_json(doc["signature"]).signer
                votes.append((BlockHeader.from_json(doc["header"]), signer))
            if msg.seq >= last:
                break
    finally:
        await reader.aclose()  # type: ignore[attr-defined]
    return votes


def test_members_fail_over_from_a_hung_nats_server_and_restarts_do_not_revote(
    cluster: NatsCluster, tmp_path: Path
) -> None:
    net = Consortium(tmp_path, cluster)
    receipts: list[Receipt] = []
    stop_submitting = asyncio.Event()

    async def submit_forever() -> None:
        # Through h2, whose server never hangs: blocks keep coming when finality allows.
        while not stop_submitting.is_set():
            try:
                receipts.append(await net.members["h2"].submit(net.access("h2"), timeout=WAIT_S))
            except OrderingError:
                continue  # not final in time: the waits below tell whether finality resumed

    async def main() -> float:
        submitting: asyncio.Task[None] | None = None
        try:
            for mid in MEMBERS:
                await net.start(mid)
            h0, h1 = net.members["h0"], net.members["h1"]
            await h0.submit(net.access("h0"), timeout=WAIT_S)
            submitting = asyncio.create_task(submit_forever())
            await _until(lambda: len(receipts) >= 3, "blocks before the fault", net)

            # -- n0 hangs with h0's and h1's connections open ---------------------
            before = h0.final_height
            stopped_at = time.monotonic()
            cluster.pause_node(HUNG_NODE)
            try:
                await _until(lambda: h0.final_height > before, "h0's next final block", net)
                stall = time.monotonic() - stopped_at
                # Still hung, beyond retry_for: following and finalizing go on.
                during = h0.final_height
                remaining = HANG_S - (time.monotonic() - stopped_at)
                await asyncio.sleep(max(remaining, 0.0))
                await _until(lambda: h1.final_height > during, "finality while n0 hangs", net)
                hung = urlparse(cluster.client_urls()[HUNG_NODE]).netloc
                for mid in ("h0", "h1"):
                    url = net.orderers[mid]._nc.connected_url
                    assert url is not None and url.netloc != hung, f"{mid} is still on n0"
            finally:
                cluster.resume_node(HUNG_NODE)
            after_hang = max(m.final_height for m in net.members.values())
            await _until(lambda: h0.final_height > after_hang + 2, "finality after SIGCONT", net)

            # -- h3 restarts and replays the whole stream -------------------------
            await net.stop("h3")
            held = net.stores[-1].head()
            assert held is not None
            restart_seq = await net.orderers["h2"].last_seq()
            h3 = await net.start("h3")
            target = net.members["h2"].final_height + 2
            await _until(lambda: h3.final_height >= target, "h3 to replay and follow", net)
            stop_submitting.set()
            await asyncio.wait_for(submitting, WAIT_S)
            submitting = None
            h3_key = net.keys["h3"].fingerprint
            revotes = [
                header.height
                for header, signer in await _votes_after(net.orderers["h2"], restart_seq)
                if signer == h3_key and header.height <= held.height
            ]
            assert revotes == [], f"h3 voted again for heights it held: {revotes}"

            # -- one chain everywhere, nobody unhealthy -------------------------------
            final = min(m.final_height for m in net.members.values())
            for height in range(1, final + 1):
                hashes = {m._store.block(height).block_hash for m in net.members.values()}
                assert len(hashes) == 1, f"members disagree at height {height}"
            for member in net.members.values():
                status = member.status()
                assert status["diverged"] is None and status["problems"] == {}
                assert not member.evidence
            return stall
        finally:
            stop_submitting.set()
            if submitting is not None:
                submitting.cancel()
                await asyncio.gather(submitting, return_exceptions=True)
            await net.close()

    stall = asyncio.run(main())
    # For the fault benchmark; the bounded waits above are the test.
    print(f"\nstall from SIGSTOP of h0's NATS server to h0's next final block: {stall:.2f} s")
