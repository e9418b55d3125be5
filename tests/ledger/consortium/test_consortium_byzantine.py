"""Byzantine votes: equivocation is proven and surfaced, bad or replayed votes never count.

A vote is ``{"kind": "vote", "header": <BlockHeader>, "signature": <over header.hash()>}``:
the signature covers only the block hash, the header says which chain and height
that hash is for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace

import pytest
from consortium_net import (
    MakeNetwork,
    Network,
    VoteRewriter,
    fake_header,
    publish_vote,
    votes_in_order,
    wait_until,
)

from medledger.core.encoding import canonical_bytes, parse_canonical
from medledger.core.keys import SigningKey
from medledger.core.models import BlockHeader, Signature
from medledger.ledger.consortium.member import ConsortiumMember, Evidence
from medledger.ledger.consortium.verify import ConsortiumPolicy
from medledger.ledger.verify import verify_chain

HONEST = ("h0", "h1", "h2")


def _has_evidence(member: ConsortiumMember) -> Callable[[], bool]:
    return lambda: bool(member.evidence)


def _header(net: Network, member: str, height: int) -> BlockHeader:
    return BlockHeader.decode(net.stores[member].block(height).header_bytes)


def assert_valid_evidence(net: Network, evidence: Evidence, member: str) -> None:
    """Anyone can check it: two different headers of this chain at one height, both signed."""
    key = net.keys[member].public
    assert evidence.member == member
    first, second = evidence.first_header, evidence.second_header
    assert first != second and first.hash() != second.hash()
    assert first.chain == second.chain == net.chain_id
    assert first.height == second.height == evidence.height
    key.verify(evidence.first, first.hash())
    key.verify(evidence.second, second.hash())
    assert evidence.first.signer == evidence.second.signer == net.keys[member].fingerprint
    doc = evidence.to_json()
    assert set(doc) == {"member", "height", "votes"}
    assert doc["member"] == member and doc["height"] == evidence.height
    assert [BlockHeader.from_json(v["header"]) for v in doc["votes"]] == [first, second]
    assert [Signature.from_json(v["signature"]) for v in doc["votes"]] == [
        evidence.first,
        evidence.second,
    ]


def evidence_lines(net: Network, member: str) -> list[bytes]:
    return net.evidence_path(member).read_bytes().splitlines()


@pytest.mark.parametrize("mode", ["fake-then-real", "real-then-fake", "two-fakes"])
def test_equivocating_member_is_named_by_every_honest_member(
    network: MakeNetwork, mode: str
) -> None:
    net = network(4)
    rewriter = VoteRewriter(net.orderer, net.keys["h3"], mode)

    async def scenario(net: Network) -> None:
        await net.start("h0", "h1", evidence=True)  # these two keep an evidence file
        await net.start("h2")  # this one does not
        await net.start("h3", orderer=rewriter)
        for via in ("h0", "h3", "h1"):
            await net.submit_many(via, [net.access("h1"), net.access("h3")])
        await net.settle()
        for mid in HONEST:
            member = net.members[mid]
            await wait_until(_has_evidence(member), f"{mid} to see the equivocation")
            (evidence,) = member.evidence  # one record per equivocator
            assert_valid_evidence(net, evidence, "h3")
            fakes = rewriter.fakes[evidence.height]
            assert {evidence.first_header, evidence.second_header} & set(fakes)
            if mode != "two-fakes":  # the real block is the other one
                real = _header(net, mid, evidence.height)
                assert real in (evidence.first_header, evidence.second_header)
            assert member.status()["evidence"] == [evidence.to_json()]
        for mid in ("h0", "h1"):
            (line,) = evidence_lines(net, mid)
            assert line == canonical_bytes(net.members[mid].evidence[0].to_json())
            assert parse_canonical(line)["member"] == "h3"
        assert not net.evidence_path("h2").exists()
        # The three honest members keep finalizing without h3.
        before = net.members["h0"].final_height
        await net.submit_many("h2", [net.access("h2") for _ in range(3)])
        assert (await net.settle()) > before
        assert len(evidence_lines(net, "h0")) == 1  # recorded once

    net.run(scenario)
    h3_fp = net.keys["h3"].fingerprint
    counted_h3_heights = set()
    for mid in HONEST:
        store = net.open_store(net.consortium_path(mid))
        verify_chain(store, policy=ConsortiumPolicy(net.genesis))
        for block in store.iter_blocks(1):
            for sig in block.signatures:
                if sig.signer == h3_fp:
                    # A counted h3 vote can only be for the real block, before it was caught.
                    net.keys["h3"].public.verify(sig, block.block_hash)
                    counted_h3_heights.add(block.height)
    if mode != "real-then-fake":
        assert not counted_h3_heights  # h3's first vote was never for the real block


def test_a_wrong_vote_alone_is_not_counted(network: MakeNetwork) -> None:
    """A member voting for a block no honest member cut adds nothing to any certificate."""
    net = network(4)
    rewriter = VoteRewriter(net.orderer, net.keys["h3"], "fake-only")

    async def scenario(net: Network) -> None:
        await net.start(*HONEST)
        await net.start("h3", orderer=rewriter)
        for via in ("h3", "h0"):
            await net.submit_many(via, [net.access("h0"), net.access("h2")])
        await net.settle()
        for member in net.members.values():
            assert not member.evidence  # one vote per height is no equivocation

    net.run(scenario)
    h3_fp = net.keys["h3"].fingerprint
    for mid in (*HONEST, "h3"):
        store = net.open_store(net.consortium_path(mid))
        verify_chain(store, policy=ConsortiumPolicy(net.genesis))
        for block in store.iter_blocks(1):
            assert h3_fp not in {s.signer for s in block.signatures}
            assert len(block.signatures) == 3


def test_conflicting_vote_after_finality_is_evidence(network: MakeNetwork) -> None:
    net = network(4)

    async def scenario(net: Network) -> None:
        await net.start("h0", "h1", "h2", "h3", evidence=True)
        await net.submit_many("h0", [net.access("h0")])
        height = await net.settle()
        real = _header(net, "h0", height)
        fake = fake_header(real, "another block")
        await publish_vote(net.orderer, fake, net.keys["h3"].sign(fake.hash()), "evil-1")
        for mid in HONEST:
            member = net.members[mid]
            await wait_until(_has_evidence(member), f"{mid} to record evidence")
            (evidence,) = member.evidence
            assert evidence.height == height
            assert (evidence.first_header, evidence.second_header) == (real, fake)
            assert_valid_evidence(net, evidence, "h3")
            (line,) = evidence_lines(net, mid)
            assert line == canonical_bytes(evidence.to_json())
        # Honest finality is unaffected.
        await net.submit_many("h1", [net.access("h1") for _ in range(2)])
        assert (await net.settle()) > height

    net.run(scenario)


async def voted_header(net: Network, height: int, voter: str, timeout: float = 10.0) -> BlockHeader:
    """The header ``voter`` voted for at ``height``, read back from the order.

    The vote is published by a task of its own after the cut, so it may reach the
    order a moment after the member's tip moved: poll for it, up to ``timeout``.
    """
    fingerprint = net.keys[voter].fingerprint
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = [
            header
            for _, header, sig in await votes_in_order(net.orderer)
            if header.height == height and sig.signer == fingerprint
        ]
        if found:
            return found[-1]
        assert loop.time() < deadline, f"no vote by {voter} at height {height}"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("bad", ["outsider", "wrong-message", "member-as-outsider-key"])
def test_invalid_votes_never_complete_a_quorum(network: MakeNetwork, bad: str) -> None:
    """With 2 of 4 up, one invalid vote more must not make a block final."""
    net = network(4)
    outsider = SigningKey.generate()

    async def scenario(net: Network) -> None:
        await net.start("h0", "h1", "h2")
        await net.submit_many("h0", [net.access("h0")])
        final = await net.settle()
        await net.stop("h2")
        h0, h1 = net.members["h0"], net.members["h1"]
        pending = net.spawn(h0.submit(net.access("h1"), timeout=20))
        await wait_until(lambda: h1.status()["tip_height"] == final + 1, "the block to be cut")
        await wait_until(lambda: h0.status()["tip_height"] == final + 1, "the block to be cut")
        cut = await voted_header(net, final + 1, "h0")  # the block waiting for a third vote
        if bad == "outsider":  # a key that is no member's
            sig = outsider.sign(cut.hash())
        elif bad == "wrong-message":  # h3's key, but over other bytes
            sig = net.keys["h3"].sign(cut.hash() + b"x")
        else:  # an outsider's signature claiming to be h3's
            forged = outsider.sign(cut.hash())
            sig = Signature(signer=net.keys["h3"].fingerprint, alg=forged.alg, sig=forged.sig)
        await publish_vote(net.orderer, cut, sig, "bad-vote")
        await asyncio.sleep(0.2)
        assert h0.final_height == final and h1.final_height == final
        assert not pending.done()
        assert not h0.evidence and not h1.evidence
        # A genuine third vote completes it.
        await net.start("h2")
        receipt = await asyncio.wait_for(pending, 10)
        assert receipt.height == final + 1
        await net.settle()

    net.run(scenario)
    store = net.open_store(net.consortium_path("h0"))
    verify_chain(store, policy=ConsortiumPolicy(net.genesis))
    signers = {s.signer for b in store.iter_blocks() for s in b.signatures}
    assert outsider.fingerprint not in signers
    assert net.keys["h3"].fingerprint not in signers


@pytest.mark.parametrize("replay", ["same-message", "earlier-signature", "signature-ahead"])
def test_replayed_honest_vote_does_not_frame_its_signer(network: MakeNetwork, replay: str) -> None:
    """Equivocation is two blocks signed at one height. Anyone who can publish to the order
    can copy honest members' votes; a copy is not a second block signed at a height and
    must not make its signer an equivocator (whose votes would then be ignored: framing
    two honest members halts a 4-member consortium).

    ``same-message``: the vote re-published as it is. ``earlier-signature``: the vote for
    block h-1 attached to block h's header. ``signature-ahead``: the vote for block h
    attached to a header claiming height h+1 (the next block, not cut yet)."""
    net = network(4)
    victims = ("h0", "h1")

    async def scenario(net: Network) -> None:
        await net.start("h0", "h1", "h2", "h3")
        await net.submit_many("h0", [net.access("h0")])
        await net.submit_many("h1", [net.access("h1")])
        height = await net.settle()
        assert height >= 2
        votes = await votes_in_order(net.orderer)
        for i, victim in enumerate(victims):
            fp = net.keys[victim].fingerprint
            mine = {h.height: (payload, h, s) for payload, h, s in votes if s.signer == fp}
            payload, header, sig = mine[height - 1]
            if replay == "same-message":
                await net.orderer.publish(f"replayed-{i}", payload)
            elif replay == "earlier-signature":
                await publish_vote(net.orderer, _header(net, "h2", height), sig, f"replayed-{i}")
            else:
                _, header, sig = mine[height]
                ahead = replace(header, height=height + 1, prev_hash=header.hash())
                await publish_vote(net.orderer, ahead, sig, f"replayed-{i}")
        # Finality goes on and needs a vote of at least one victim (only h2, h3 are left).
        receipt = await net.members["h2"].submit(net.access("h2"), timeout=3)
        assert receipt.height == height + 1
        await net.settle()
        for mid, member in net.members.items():
            assert not member.evidence, f"{mid} accuses an honest member of equivocation"
            assert member.status()["evidence"] == []

    net.run(scenario)
    store = net.open_store(net.consortium_path("h3"))
    verify_chain(store, policy=ConsortiumPolicy(net.genesis))
    head = store.head()
    assert head is not None
    victim_fps = {net.keys[v].fingerprint for v in victims}
    assert victim_fps & {s.signer for s in head.signatures}


@pytest.mark.parametrize("claim", ["same-block", "next-height"])
def test_replayed_certificate_cannot_halt_finality(network: MakeNetwork, claim: str) -> None:
    """Re-publishing block h's (public) finality certificate must not stop h+1 from becoming
    final: with block h's header the votes are duplicates; attached to a header that claims
    height h+1 they do not verify (they sign block h's hash)."""
    net = network(4)

    async def scenario(net: Network) -> None:
        await net.start("h0", "h1", "h2", "h3")
        await net.submit_many("h0", [net.access("h0")])
        height = await net.settle()
        block = net.stores["h0"].block(height)
        header = BlockHeader.decode(block.header_bytes)
        if claim == "next-height":
            header = replace(header, height=height + 1, prev_hash=block.block_hash)
        for i, sig in enumerate(block.signatures):
            await publish_vote(net.orderer, header, sig, f"replay-{i}")
        receipt = await net.members["h1"].submit(net.access("h1"), timeout=3)
        assert receipt.height == height + 1
        await net.settle()
        for member in net.members.values():
            assert not member.evidence

    net.run(scenario)


def test_votes_signed_for_a_private_chain_block_are_ignored(network: MakeNetwork) -> None:
    """A member signs its private chain's blocks with the same key as its consortium votes.
    Those signatures (over private-chain block hashes, at the same heights) must neither
    frame it as an equivocator nor count as consortium votes."""
    net = network(4)

    async def scenario(net: Network) -> None:
        await net.start("h0", "h1", "h2", "h3")
        for via in ("h0", "h1", "h3"):
            await net.submit_many(via, [net.access(via)])
        final = await net.settle()
        chain = net.private_chain("h2")
        for i in range(final + 3):  # one private block per write: heights 1..final+3
            await chain.submit("record.put", {"i": i})
        private_votes = [
            (BlockHeader.decode(b.header_bytes), b.signatures[0])
            for b in chain.store.iter_blocks(1)
        ]
        assert {h.height for h, _ in private_votes} >= set(range(1, final + 2))
        assert all(h.chain == "private:h2" for h, _ in private_votes)
        # Heights h2 has voted on: a private-chain "vote" there is a second signed hash.
        for header, sig in private_votes[:final]:
            await publish_vote(net.orderer, header, sig, f"private-{header.height}")
        # The private block's signature attached to the consortium header at its height.
        for header, sig in private_votes[:final]:
            consortium = _header(net, "h0", header.height)
            await publish_vote(net.orderer, consortium, sig, f"mixed-{header.height}")
        more = await net.submit_many("h0", [net.access("h0")])
        assert more[0].height == final + 1
        await net.settle()
        for member in net.members.values():
            assert not member.evidence
        # Only h0 and h1 up: h2's private block at the pending height is no third vote.
        await net.stop("h2", "h3")
        h0, h1 = net.members["h0"], net.members["h1"]
        pending = net.spawn(h0.submit(net.access("h1"), timeout=20))
        await wait_until(lambda: h0.status()["tip_height"] == final + 2, "the block to be cut")
        await wait_until(lambda: h1.status()["tip_height"] == final + 2, "the block to be cut")
        header, sig = private_votes[final + 1]
        assert header.height == final + 2
        await publish_vote(net.orderer, header, sig, "private-pending")
        cut = await voted_header(net, final + 2, "h0")
        await publish_vote(net.orderer, cut, sig, "mixed-pending")
        await asyncio.sleep(0.2)
        assert h0.final_height == h1.final_height == final + 1
        assert not pending.done()
        assert not h0.evidence and not h1.evidence
        await net.start("h2")
        receipt = await asyncio.wait_for(pending, 10)
        assert receipt.height == final + 2

    net.run(scenario)
    store = net.open_store(net.consortium_path("h0"))
    verify_chain(store, policy=ConsortiumPolicy(net.genesis))
