"""The consortium over a real replicated order: 4 members, a 3-node NATS JetStream cluster.

Each member has its own ``JetStreamOrderer`` connection to one R3 stream (as each
institution would run its own client), its own ``SqliteChainStore`` and private chain.
Mid-run one NATS node is SIGKILLed (the stream leader, so a new one must be elected)
and one member stops abruptly; the other three (a quorum of 3 of 4) keep ordering and
finalizing. Both come back: the member, re-created over its existing store, replays the
stream from seq 1 and catches up, and no member ever finalizes a block that another
member's block at that height contradicts.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from consortium_net import MakeNetwork, Network

from medledger.core.consortium import ConsortiumParams, MemberSet
from medledger.core.models import BlockHeader, Receipt
from medledger.ledger.consortium.member import ConsortiumMember
from medledger.ledger.consortium.rules import AnchorRecord
from medledger.ledger.consortium.verify import ConsortiumPolicy, anchored_checkpoints
from medledger.ledger.ordering.jetstream import JetStreamOrderer
from medledger.ledger.verify import verify_chain
from medledger.localnet.natsserver import NatsCluster

MEMBERS = ("h0", "h1", "h2", "h3")
SURVIVORS = ("h0", "h1", "h2")
CRASHED = "h3"
PARAMS = ConsortiumParams(cut_after_ms=20)
#: Long enough to ride out a stream leader election (~5-7 s after a SIGKILL).
SUBMIT_TIMEOUT = 30.0


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsCluster]:
    """A 3-node cluster of this test's own (nodes are killed and restarted)."""
    cluster = NatsCluster(tmp_path / "nats", size=3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def stream_leader(cluster: NatsCluster, stream: str) -> int:
    """Index of the node leading ``stream``, from the monitoring endpoint."""
    for node in cluster.nodes:
        if not node.running:
            continue
        with urllib.request.urlopen(f"{node.monitor_url}/jsz?streams=true", timeout=2) as resp:
            info = json.load(resp)
        for account in info.get("account_details", []):
            for entry in account.get("stream_detail", []):
                if entry["name"] == stream and entry.get("cluster", {}).get("leader"):
                    return [n.name for n in cluster.nodes].index(entry["cluster"]["leader"])
    raise AssertionError(f"no leader found for {stream}")


@dataclass
class Orders:
    """One JetStream connection per member, all to the same stream."""

    cluster: NatsCluster
    stream: str = field(default_factory=lambda: f"CONS_{uuid.uuid4().hex[:12]}")
    conns: dict[str, JetStreamOrderer] = field(default_factory=dict)

    @property
    def subject(self) -> str:
        return f"cons.{self.stream.lower()}"

    async def connect(self, member_id: str) -> JetStreamOrderer:
        urls = self.cluster.client_urls()
        shift = int(member_id[1:]) % len(urls)  # members prefer different nodes
        conn = await JetStreamOrderer.connect(
            urls[shift:] + urls[:shift],
            stream=self.stream,
            subject=self.subject,
            replicas=3,
            name=member_id,
        )
        self.conns[member_id] = conn
        return conn

    async def close(self, member_id: str) -> None:
        await self.conns.pop(member_id).close()

    async def close_all(self) -> None:
        for member_id in list(self.conns):
            await self.close(member_id)


class FinalityWatch:
    """Samples every running member's stored final blocks; any two that differ at one
    height are a contradiction (recorded, asserted at the end)."""

    def __init__(self, net: Network) -> None:
        self.net = net
        self.final: dict[int, bytes] = {}
        self.checked: dict[str, int] = {}
        self.contradictions: list[str] = []

    def forget(self, member_id: str) -> None:
        """Re-check a restarted member's chain from block 1."""
        self.checked.pop(member_id, None)

    def sample(self) -> None:
        for mid, member in list(self.net.members.items()):
            store = self.net.stores[mid]
            for height in range(self.checked.get(mid, 0) + 1, member.final_height + 1):
                block_hash = store.block(height).block_hash
                seen = self.final.setdefault(height, block_hash)
                if seen != block_hash:
                    self.contradictions.append(f"{mid} finalized another block {height}")
                self.checked[mid] = height

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(0.02)


class Submitter:
    """Keeps submitting access transactions through the surviving members."""

    def __init__(self, net: Network) -> None:
        self.net = net
        self.receipts: list[Receipt] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        round_ = 0
        while not self.stop.is_set():
            via = SURVIVORS[round_ % len(SURVIVORS)]
            member = self.net.members[via]
            txs = [self.net.access(via, holder) for holder in MEMBERS]
            self.receipts += await asyncio.gather(
                *(member.submit(tx, timeout=SUBMIT_TIMEOUT) for tx in txs)
            )
            round_ += 1


async def crash(net: Network, orders: Orders, member_id: str) -> None:
    """Stop a member abruptly: its connection drops and its tasks die mid-work.

    No ``ConsortiumMember.close``; its store handle is left as a killed process leaves
    its file (closed only at teardown).
    """
    member: ConsortiumMember = net.members.pop(member_id)
    net.stores.pop(member_id)
    await orders.close(member_id)
    for supervised in member.tasks:
        await supervised.close()
    tasks = list(member._background)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def expected_anchor(net: Network, mid: str) -> AnchorRecord:
    chain = net.chains[mid]
    return AnchorRecord(
        institution=mid,
        height=chain.head.height,
        log_size=chain.head.log_size,
        log_root=chain.head.log_root,
        block_hash=chain.head_hash,
    )


async def anchor_round(net: Network, members: tuple[str, ...], tag: str) -> None:
    for mid in members:
        await net.write_private(mid, 3, tag=tag)
        assert await net.anchorers[mid].anchor_once() is not None


@pytest.mark.slow
def test_consortium_survives_a_nats_node_kill_and_a_member_crash(
    network: MakeNetwork, nats: NatsCluster
) -> None:
    net = network(4, params=PARAMS)
    orders = Orders(nats)

    async def scenario(net: Network) -> int:
        watch = FinalityWatch(net)
        try:
            for mid in MEMBERS:
                await net.start(mid, orderer=await orders.connect(mid))
            net.spawn(watch.run())
            # Anchors and access records become final on every member.
            await anchor_round(net, MEMBERS, "before")
            await net.submit_many("h1", [net.access("h1", holder) for holder in MEMBERS])
            before = await net.settle(timeout=SUBMIT_TIMEOUT)
            for member in net.members.values():
                assert member.state.anchors == {m: expected_anchor(net, m) for m in MEMBERS}

            # Mid-run: the stream leader's node is SIGKILLed and h3 stops abruptly.
            submitter = Submitter(net)
            submitting = net.spawn(submitter.run())
            await net.members["h0"].wait_final(before + 2, timeout=SUBMIT_TIMEOUT)
            victim = stream_leader(nats, orders.stream)
            await asyncio.to_thread(nats.kill_node, victim)
            await crash(net, orders, CRASHED)
            assert not nats.nodes[victim].running
            # Ordering and finality go on: 3 of 4 members, 2 of 3 nodes.
            at_crash = max(m.final_height for m in net.members.values())
            await anchor_round(net, SURVIVORS, "during")
            for mid in SURVIVORS:
                await net.members[mid].wait_final(at_crash + 3, timeout=SUBMIT_TIMEOUT)
            during = len(submitter.receipts)

            # Both come back; h3 replays the stream from seq 1 over its existing store.
            await asyncio.to_thread(nats.start_node, victim)
            watch.forget(CRASHED)
            (h3,) = await net.start(CRASHED, orderer=await orders.connect(CRASHED))
            await h3.wait_final(net.members["h0"].final_height, timeout=SUBMIT_TIMEOUT)
            submitter.stop.set()
            await asyncio.wait_for(submitting, SUBMIT_TIMEOUT)
            assert len(submitter.receipts) > during
            assert all(r.height > before for r in submitter.receipts)
            # h3 takes part again: its anchor and records become final everywhere.
            await anchor_round(net, (CRASHED,), "after")
            await net.submit_many(CRASHED, [net.access(CRASHED, h) for h in MEMBERS])
            height = await net.settle(timeout=SUBMIT_TIMEOUT)
            assert height > at_crash + 3
            watch.sample()
            assert watch.checked == dict.fromkeys(MEMBERS, height)
            assert watch.contradictions == []
            for member in net.members.values():
                assert member.status()["diverged"] is None
                assert not member.evidence
                assert member.state.anchors == {m: expected_anchor(net, m) for m in MEMBERS}
            return height
        finally:
            for mid in list(net.members):
                await net.stop(mid)
            await orders.close_all()

    height = net.run(scenario)
    stores = {mid: net.open_store(net.consortium_path(mid)) for mid in MEMBERS}
    reference = stores["h0"]
    quorum = MemberSet(net.genesis.members).quorum
    for mid, store in stores.items():
        head = store.head()
        assert head is not None and head.height == height, mid
        for h in range(height + 1):
            mine, ref = store.block(h), reference.block(h)
            assert mine.header_bytes == ref.header_bytes, f"{mid} block {h} header differs"
            assert mine.block_hash == ref.block_hash
            assert mine.tx_data == ref.tx_data, f"{mid} block {h} transactions differ"
            assert mine.first_index == ref.first_index
            if h:
                # Votes also travel beside the order, so members may hold different
                # quorums; each must be one (verify_chain below checks the signatures).
                signers = {s.signer for s in mine.signatures}
                assert len(signers) == len(mine.signatures) >= quorum, f"{mid} block {h}"
        report = verify_chain(store, policy=ConsortiumPolicy(net.genesis))
        assert report.blocks == height + 1
        times = [BlockHeader.decode(b.header_bytes).time_ms for b in store.iter_blocks()]
        assert times == sorted(times)
    # Every institution's private chain verifies against all of its final anchors.
    for mid in MEMBERS:
        checkpoints = anchored_checkpoints(reference, mid)
        assert len(checkpoints) == 2  # before + during (h3: before + after)
        private = net.open_store(net.directory / f"{mid}-private.db")
        verify_chain(private, expected_key=net.keys[mid].public, checkpoints=checkpoints)
