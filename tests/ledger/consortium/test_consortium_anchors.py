"""Anchoring private chains on the consortium chain, and what anchors let an auditor prove."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from consortium_net import MakeNetwork, Network, publish_tx, sign_tx, stored_tx_hashes

from medledger.core.errors import (
    InconsistentLog,
    InvalidInput,
    InvalidSignature,
    MedledgerError,
)
from medledger.core.models import Transaction
from medledger.ledger.anchoring import Anchorer
from medledger.ledger.consortium.rules import AnchorRecord
from medledger.ledger.consortium.verify import ConsortiumPolicy, anchored_checkpoints
from medledger.ledger.integrity import check_against_anchor, last_anchor
from medledger.ledger.verify import verify_chain
from medledger.storage.ports import ChainStore

INSTITUTIONS = ("h0", "h1", "h2", "h3")
_NO_ANCHOR = AnchorRecord(institution="", height=0, log_size=0, log_root=b"", block_hash=b"")


def expected_anchor(net: Network, mid: str) -> AnchorRecord:
    chain = net.chains[mid]
    return AnchorRecord(
        institution=mid,
        height=chain.head.height,
        log_size=chain.head.log_size,
        log_root=chain.head.log_root,
        block_hash=chain.head_hash,
    )


async def anchor_all(net: Network, rounds: int, writes: int = 5) -> None:
    for rnd in range(rounds):
        for mid in INSTITUTIONS:
            await net.write_private(mid, writes + rnd, tag=f"round-{rnd}")
            receipt = await net.anchorers[mid].anchor_once()
            assert receipt is not None
        assert await net.anchorers["h0"].anchor_once() is None  # nothing new to anchor


def test_anchors_become_final_and_are_tracked(network: MakeNetwork) -> None:
    net = network(4)

    async def scenario(net: Network) -> None:
        await net.start(*INSTITUTIONS)
        await anchor_all(net, rounds=3)
        await net.settle()
        expected = {mid: expected_anchor(net, mid) for mid in INSTITUTIONS}
        for member in net.members.values():
            assert member.state.anchors == expected
            status = member.status()["anchors"]
            assert status == {mid: rec.to_json() for mid, rec in expected.items()}

    net.run(scenario)
    for mid in INSTITUTIONS:
        store = net.open_store(net.consortium_path(mid))
        policy = ConsortiumPolicy(net.genesis)
        verify_chain(store, policy=policy)
        assert set(policy.state.anchors) == set(INSTITUTIONS)
        for inst in INSTITUTIONS:
            cps = anchored_checkpoints(store, inst)
            assert len(cps) == 3
            assert [c.size for c in cps] == sorted({c.size for c in cps})  # strictly growing
            assert cps[-1].size == policy.state.anchors[inst].log_size
            assert cps[-1].root == policy.state.anchors[inst].log_root


# -- forged anchors ----------------------------------------------------------------------

Forge = Callable[[Network], Awaitable[Transaction]]


def _resign(net: Network, tx: Transaction, body: dict[str, Any], signer: str) -> Transaction:
    unsigned = Transaction(type=tx.type, chain=tx.chain, body=body, time_ms=tx.time_ms)
    return sign_tx(unsigned, net.keys[signer])


async def forge_bad_proof(net: Network) -> Transaction:
    tx = net.anchorers["h1"].anchor_tx()
    assert tx is not None
    body = dict(tx.body)
    assert body["proof"], "the test needs a non-empty consistency proof"
    first = bytes.fromhex(body["proof"][0])
    body["proof"] = [bytes([first[0] ^ 1]).hex() + first[1:].hex(), *body["proof"][1:]]
    return _resign(net, tx, body, "h1")


async def forge_rewritten_history(net: Network) -> Transaction:
    """h1 rewrites its private chain (its own key) to be longer than anchored, then anchors."""
    size = net.chains["h1"].head.log_size
    rewritten = await net.rewritten_private("h1", size + 3)
    anchorer = Anchorer(
        institution="h1", chain=rewritten, member=net.members["h1"], key=net.keys["h1"]
    )
    tx = anchorer.anchor_tx()
    assert tx is not None
    assert tx.body["log_size"] > net.members["h1"].state.anchors["h1"].log_size
    return tx


async def forge_other_institution(net: Network) -> Transaction:
    """h0 anchors h1's (real, consistent) new head with h0's key."""
    tx = net.anchorers["h1"].anchor_tx()
    assert tx is not None
    return _resign(net, tx, dict(tx.body), "h0")


async def forge_wrong_prev_size(net: Network) -> Transaction:
    tx = net.anchorers["h1"].anchor_tx()
    assert tx is not None
    body = dict(tx.body)
    body["prev_size"] = body["prev_size"] - 1
    return _resign(net, tx, body, "h1")


async def forge_same_size(net: Network) -> Transaction:
    prev = net.members["h1"].state.anchors["h1"]
    tx = net.anchorers["h1"].anchor_tx()
    assert tx is not None
    body = dict(tx.body, log_size=prev.log_size, log_root=prev.log_root.hex(), proof=[])
    return _resign(net, tx, body, "h1")


async def forge_shrinking_size(net: Network) -> Transaction:
    prev = net.members["h1"].state.anchors["h1"]
    tx = net.anchorers["h1"].anchor_tx()
    assert tx is not None
    body = dict(tx.body, log_size=prev.log_size - 2, proof=[])
    return _resign(net, tx, body, "h1")


FORGERIES: dict[str, tuple[Forge, type[MedledgerError], str]] = {
    "bad-consistency-proof": (
        forge_bad_proof,
        InconsistentLog,
        "anchor of h1 is not consistent with its previous anchor",
    ),
    "rewritten-history": (
        forge_rewritten_history,
        InconsistentLog,
        "anchor of h1 is not consistent with its previous anchor",
    ),
    "other-institution": (
        forge_other_institution,
        InvalidSignature,
        "anchor for 'h1' signed by member 'h0'",
    ),
    "wrong-prev-size": (forge_wrong_prev_size, InconsistentLog, "builds on size"),
    "same-log-size": (forge_same_size, InvalidInput, "does not advance"),
    "shrinking-log-size": (forge_shrinking_size, InvalidInput, "does not advance"),
}


@pytest.mark.parametrize("case", sorted(FORGERIES))
def test_forged_anchor_is_refused_by_every_member(network: MakeNetwork, case: str) -> None:
    forge, error, reason = FORGERIES[case]
    net = network(4)

    async def scenario(net: Network) -> bytes:
        await net.start(*INSTITUTIONS)
        await anchor_all(net, rounds=1)
        await net.write_private("h1", 6, tag="after")
        await net.settle()
        anchors_before = dict(net.members["h0"].state.anchors)
        forged = await forge(net)
        for mid in INSTITUTIONS:  # whichever member it is submitted through
            with pytest.raises(error, match=reason):
                await net.members[mid].submit(forged, timeout=5)
        # Straight into the order: every member's own check refuses it.
        await publish_tx(net.orderer, forged)
        await net.submit_many("h2", [net.access("h2")])
        await net.settle()
        for member in net.members.values():
            assert member.state.anchors == anchors_before
            assert forged.hash() not in member.state.seen
        # The honest anchor still goes through afterwards.
        assert await net.anchorers["h1"].anchor_once() is not None
        await net.settle()
        for member in net.members.values():
            assert member.state.anchors["h1"] == expected_anchor(net, "h1")
        return forged.hash()

    forged_hash = net.run(scenario)
    for mid in INSTITUTIONS:
        store = net.open_store(net.consortium_path(mid))
        assert forged_hash not in stored_tx_hashes(store)
        verify_chain(store, policy=ConsortiumPolicy(net.genesis))


def test_first_anchor_must_not_carry_a_proof(network: MakeNetwork) -> None:
    net = network(4)

    async def scenario(net: Network) -> None:
        await net.start(*INSTITUTIONS)
        await net.write_private("h2", 3)
        tx = net.anchorers["h2"].anchor_tx()
        assert tx is not None and tx.body["prev_size"] == 0
        body = dict(tx.body, proof=[tx.body["log_root"]])
        with pytest.raises(InvalidInput, match="first anchor carries no consistency proof"):
            await net.members["h2"].submit(_resign(net, tx, body, "h2"), timeout=5)
        assert net.members["h2"].state.anchors == {}

    net.run(scenario)


# -- anchored checkpoints against a private chain ---------------------------------------


def test_private_chain_verifies_against_every_final_anchor(network: MakeNetwork) -> None:
    net = network(4)

    async def scenario(net: Network) -> int:
        await net.start(*INSTITUTIONS)
        await anchor_all(net, rounds=4, writes=3)
        await net.write_private("h1", 4, tag="unanchored-tail")
        await net.settle()
        return net.chains["h1"].head.log_size

    size = net.run(scenario)
    consortium = net.open_store(net.consortium_path("h3"))
    checkpoints = anchored_checkpoints(consortium, "h1")
    assert len(checkpoints) == 4
    assert all(c.size < size for c in checkpoints)
    private = net.open_store(net.directory / "h1-private.db")
    report = verify_chain(private, expected_key=net.keys["h1"].public, checkpoints=checkpoints)
    assert report.checkpoints == 4
    assert report.log_size == size
    # Another institution's anchors do not fit h1's chain.
    with pytest.raises(InconsistentLog):
        verify_chain(private, checkpoints=anchored_checkpoints(consortium, "h2"))


@pytest.mark.parametrize("extra", [5, -2])
def test_rewritten_private_chain_fails_against_anchors(network: MakeNetwork, extra: int) -> None:
    """Re-signing a different history with the institution's own key passes every signature
    check; only the anchors catch it (longer rewrite: roots differ; shorter: truncated)."""
    net = network(4)

    async def scenario(net: Network) -> ChainStore:
        await net.start(*INSTITUTIONS)
        await anchor_all(net, rounds=2)
        await net.settle()
        size = net.chains["h1"].head.log_size
        rewritten = await net.rewritten_private("h1", size - 1 + extra)
        return rewritten.store

    rewritten = net.run(scenario)
    consortium = net.open_store(net.consortium_path("h0"))
    checkpoints = anchored_checkpoints(consortium, "h1")
    assert len(checkpoints) == 2
    # The rewrite is internally perfect, signed by h1's own key…
    verify_chain(rewritten, expected_key=net.keys["h1"].public)
    # …but contradicts what h1 anchored; the message names both chains and their heights.
    with pytest.raises(
        InconsistentLog,
        match=r"^private chain of h1(, block \d+)?: .* published in the anchor of private height "
        r"\d+ in consortium chain [^,]+, block \d+[;,] ",
    ):
        verify_chain(rewritten, expected_key=net.keys["h1"].public, checkpoints=checkpoints)


def test_last_anchor_finds_a_members_newest_final_anchor_in_a_store(network: MakeNetwork) -> None:
    """What a node checks its private chain against at start (``ledger.integrity``)."""
    net = network(4)

    async def scenario(net: Network) -> None:
        await net.start(*INSTITUTIONS)
        await anchor_all(net, rounds=2)
        await net.settle()

    net.run(scenario)
    store = net.stores["h1"]
    for mid in INSTITUTIONS:
        found = last_anchor(store, mid)
        assert found == expected_anchor(net, mid)
        assert found is not None and found.tx_hash in stored_tx_hashes(store)
        check_against_anchor(net.chains[mid].store, found)
    assert last_anchor(store, "h9") is None


class _FixedClock:
    def __init__(self, now_ms: int) -> None:
        self.now = now_ms

    def now_ms(self) -> int:
        return self.now


def test_every_institution_anchors_at_the_same_multiples_of_the_interval(
    network: MakeNetwork,
) -> None:
    """Anchors of all institutions meet in one block: each waits for the next multiple
    of the interval on the wall clock, whatever moment its last anchor ended."""
    net = network(2)
    clock = _FixedClock(0)

    async def scenario(net: Network) -> None:
        await net.start("h0", "h1")
        interval_ms = net.genesis.params.anchor_interval_ms
        anchorers = [
            Anchorer(
                institution=mid,
                chain=net.private_chain(mid),
                member=net.members[mid],
                key=net.keys[mid],
                clock=clock,
            )
            for mid in ("h0", "h1")
        ]
        base = 1_700_000_000_000 - 1_700_000_000_000 % interval_ms
        for offset in (0, 1, interval_ms // 2, interval_ms - 1):
            clock.now = base + offset
            for anchorer in anchorers:
                delay_ms = anchorer.next_anchor_delay_s() * 1000
                # The next multiple of the interval, within one interval from now.
                assert 0 < delay_ms <= interval_ms
                assert round(clock.now + delay_ms) % interval_ms == 0

    net.run(scenario)


def test_an_anchor_builds_on_the_previous_one_once_it_is_in_the_order(
    network: MakeNetwork,
) -> None:
    """The next anchor need not wait for the previous one to be final: it extends the
    newest anchor in the order, and both become final in turn."""
    net = network(4)

    async def scenario(net: Network) -> None:
        await net.start(*INSTITUTIONS)
        await net.write_private("h1", 3)
        anchorer, member = net.anchorers["h1"], net.members["h1"]
        first = anchorer.anchor_tx()
        assert first is not None
        submitted = asyncio.ensure_future(member.submit(first))
        deadline = asyncio.get_running_loop().time() + 10
        while (member.ordered_anchor("h1") or _NO_ANCHOR).log_size < first.body["log_size"]:
            assert asyncio.get_running_loop().time() < deadline, "the anchor was never ordered"
            await asyncio.sleep(0.001)
        await net.write_private("h1", 2)
        second = anchorer.anchor_tx()
        assert second is not None
        assert second.body["prev_size"] == first.body["log_size"]
        await asyncio.gather(submitted, member.submit(second))
        await net.settle()
        for each in net.members.values():
            assert each.state.anchors["h1"].log_size == second.body["log_size"]

    net.run(scenario)
