"""Consortium block time: bounded by a majority of the members' clocks, not by any one.

Members here share one solo order *file*, each through its own handle stamping
publishes with that member's clock — as one node process per institution does
(``medledger network up``). One member's clock is wrong; block times must stay
within what the honest clocks say, and recover as soon as its clock is fixed.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from dataclasses import replace

import pytest
from consortium_net import MakeNetwork, Network, now_ms, order_messages, votes_in_order

from medledger.core.consortium import clock_bytes
from medledger.core.encoding import canonical_bytes, parse_canonical
from medledger.core.errors import VerificationError
from medledger.core.keys import SigningKey
from medledger.core.models import BlockHeader, Signature
from medledger.ledger.consortium.verify import ConsortiumPolicy
from medledger.ledger.verify import verify_chain

MEMBERS = ("h0", "h1", "h2")
DAY_MS = 24 * 3600 * 1000


class OffsetClock:
    """The system clock plus ``offset_ms`` (settable: an operator fixes the clock)."""

    def __init__(self, offset_ms: int) -> None:
        self.offset_ms = offset_ms

    def now_ms(self) -> int:
        return now_ms() + self.offset_ms


def block_times(net: Network, member: str) -> list[int]:
    store = net.open_store(net.consortium_path(member))
    return [BlockHeader.decode(b.header_bytes).time_ms for b in store.iter_blocks(1)]


async def one_block_each(net: Network, wrong: OffsetClock, rounds: int) -> None:
    """``rounds`` rounds of one tx per member, each round final before the next.

    The wrong member's tx carries its own (wrong) clock's time, as its node would sign it.
    """
    for _ in range(rounds):
        for via in MEMBERS:
            time_ms = wrong.now_ms() if via == "h2" else None
            tx = net.tx("access", net.access_body(via), via, time_ms=time_ms)
            await net.submit_many(via, [tx])
        await net.settle()


@pytest.mark.parametrize(
    "offset_ms", [300_000, 31 * DAY_MS, -3600_000], ids=["+300s", "+31days", "-1h"]
)
def test_one_members_wrong_clock_does_not_move_block_time(
    network: MakeNetwork, offset_ms: int
) -> None:
    net = network(3)
    wrong = OffsetClock(offset_ms)

    async def scenario(net: Network) -> tuple[int, int, int, int]:
        await net.start("h0", orderer=net.file_orderer())
        await net.start("h1", orderer=net.file_orderer())
        await net.start("h2", orderer=net.file_orderer(wrong), clock=wrong)
        skewed_from = now_ms()
        await one_block_each(net, wrong, rounds=3)
        skewed_until = now_ms()
        wrong.offset_ms = 0  # the operator fixes the clock
        fixed_from = now_ms()
        await one_block_each(net, wrong, rounds=2)
        return skewed_from, skewed_until, fixed_from, now_ms()

    skewed_from, skewed_until, fixed_from, end = net.run(scenario)
    times = block_times(net, "h0")
    assert len(times) >= 15
    for member in MEMBERS[1:]:
        assert block_times(net, member) == times
    # No block is later than the honest clocks' time, while skewed or after the fix.
    assert all(net.genesis.time_ms <= t <= end for t in times), (offset_ms, times)
    assert times == sorted(times)
    # The honest majority's clocks still drive time: the last block of each phase is
    # dated within that phase (its readings came from votes cast during it).
    skewed_blocks = times[:9]
    assert skewed_from <= skewed_blocks[-1] <= skewed_until
    assert fixed_from <= times[-1] <= end
    for member in MEMBERS:
        verify_chain(
            net.open_store(net.consortium_path(member)), policy=ConsortiumPolicy(net.genesis)
        )


def test_votes_carry_a_signed_clock_reading(network: MakeNetwork) -> None:
    """A vote's clock reading is signed by the voter over (chain, height, time)."""
    net = network(3)

    async def scenario(net: Network) -> list[bytes]:
        await net.start(*MEMBERS)
        await net.submit_many("h0", [net.access("h0")])
        await net.settle()
        return [payload for _, payload in await order_messages(net.orderer)]

    payloads = net.run(scenario)
    votes = [d for d in map(parse_canonical, payloads) if d.get("kind") == "vote"]
    assert votes
    by_fp = {k.fingerprint: k for k in net.keys.values()}
    for doc in votes:
        assert set(doc) == {"kind", "header", "signature", "time_ms", "clock"}
        clock = Signature.from_json(doc["clock"])
        assert clock.signer == Signature.from_json(doc["signature"]).signer
        height = doc["header"]["height"]
        by_fp[clock.signer].public.verify(clock, clock_bytes(net.chain_id, height, doc["time_ms"]))


def test_a_block_dated_beyond_its_transactions_fails_verification(network: MakeNetwork) -> None:
    """Even with a valid finality certificate: a quorum of members cannot date a block a
    month after its transactions were signed."""
    net = network(4)

    async def scenario(net: Network) -> int:
        await net.start("h0", "h1", "h2", "h3")
        for via in ("h0", "h1"):
            await net.submit_many(via, [net.access(via)])
        return await net.settle()

    head = net.run(scenario)
    path = net.consortium_path("h1")
    verify_chain(net.open_store(path), policy=ConsortiumPolicy(net.genesis))
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        (header_bytes,) = conn.execute(
            "SELECT header FROM blocks WHERE height = ?", (head,)
        ).fetchone()
        header = BlockHeader.decode(bytes(header_bytes))
        forged = replace(header, time_ms=header.time_ms + 31 * DAY_MS)
        forged_hash = forged.hash()
        # A valid certificate: a quorum (3 of 4) of the members' keys sign the forged hash.
        sigs = [net.keys[m].sign(forged_hash).to_json() for m in ("h0", "h1", "h2")]
        conn.execute(
            "UPDATE blocks SET header = ?, hash = ?, signatures = ? WHERE height = ?",
            (forged.encode(), forged_hash, json.dumps(sigs, separators=(",", ":")), head),
        )
    finally:
        conn.close()
    with pytest.raises(
        VerificationError, match=rf"^consortium chain \S+, block {head}: time \d+ is \d+ ms beyond"
    ):
        verify_chain(net.open_store(path), policy=ConsortiumPolicy(net.genesis))


def _vote_with_reading(
    net: Network, header: BlockHeader, voter: str, time_ms: int, *, clock_key: SigningKey
) -> bytes:
    """A vote of ``voter`` for ``header`` (validly signed) with a clock reading signed by
    ``clock_key`` (the voter's own key, or someone else's)."""
    return canonical_bytes(
        {
            "kind": "vote",
            "header": header.to_json(),
            "signature": net.keys[voter].sign(header.hash()).to_json(),
            "time_ms": time_ms,
            "clock": clock_key.sign(clock_bytes(net.chain_id, header.height, time_ms)).to_json(),
        }
    )


@pytest.mark.parametrize("signed_by", ["voter", "outsider"])
def test_clock_readings_count_only_when_the_voter_signed_them(
    network: MakeNetwork, signed_by: str
) -> None:
    """Readings a month ahead for three of four members: forged ones change nothing; real
    ones (a majority's clocks) move block time, but never more than max_clock_skew_ms past
    the block's newest transaction."""
    net = network(4)
    outsider = SigningKey.generate()
    ahead = now_ms() + 31 * DAY_MS

    async def scenario(net: Network) -> tuple[int, int]:
        await net.start("h0", "h1", "h2", "h3")
        await net.submit_many("h0", [net.access("h0")])
        height = await net.settle()
        header = BlockHeader.decode(net.stores["h0"].block(height).header_bytes)

        async def all_voted() -> bool:
            votes = await votes_in_order(net.orderer)
            return len({sig.signer for _, h, sig in votes if h.height == height}) == 4

        # Every real vote first, so the readings below are each member's latest.
        deadline = asyncio.get_running_loop().time() + 10
        while not await all_voted():
            assert asyncio.get_running_loop().time() < deadline, "not every member voted"
            await asyncio.sleep(0.005)
        for voter in ("h1", "h2", "h3"):
            key = net.keys[voter] if signed_by == "voter" else outsider
            payload = _vote_with_reading(net, header, voter, ahead, clock_key=key)
            await net.orderer.publish(f"late-vote-{voter}", payload)
        tx = net.access("h0")
        await net.submit_many("h0", [tx])
        return await net.settle(), tx.time_ms

    last, tx_time = net.run(scenario)
    times = block_times(net, "h0")
    assert len(times) == last
    skew = net.genesis.params.max_clock_skew_ms
    if signed_by == "outsider":
        assert times[-1] <= now_ms()
    else:
        assert times[-1] == tx_time + skew
    verify_chain(net.open_store(net.consortium_path("h2")), policy=ConsortiumPolicy(net.genesis))
