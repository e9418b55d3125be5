"""Membership changes (``member.add`` / ``remove`` / ``rotate`` / ``tls``) by quorum."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from consortium_net import MakeNetwork, Network, now_ms, stored_tx_hashes, wait_until

from medledger.core.consortium import Member, MemberSet
from medledger.core.errors import InvalidInput, InvalidSignature
from medledger.core.keys import SigningKey
from medledger.core.models import Transaction
from medledger.ledger.anchoring import Anchorer
from medledger.ledger.consortium.verify import ConsortiumPolicy
from medledger.ledger.verify import verify_chain
from medledger.services.tls import create_certificate
from medledger.storage.sqlite.chain import SqliteChainStore

FOUNDERS = ("h0", "h1", "h2", "h3")

MemberView = list[tuple[str, str]]


def view(members: MemberSet) -> MemberView:
    return [(m.id, m.fingerprint) for m in members.members]


def add_body(member_id: str, key: SigningKey) -> dict[str, Any]:
    member = Member(id=member_id, name=f"Hospital {member_id}", signing_key=key.public)
    return {"member": member.to_json()}


def rotate_body(member_id: str, key: SigningKey) -> dict[str, Any]:
    return {"id": member_id, "signing_key": key.public.der().hex()}


def tls_body(member_id: str) -> dict[str, Any]:
    _, cert = create_certificate(member_id, ["127.0.0.1"], now_ms=now_ms())
    return {"id": member_id, "tls_cert": cert.hex()}


def members_by_height(net: Network, store: SqliteChainStore) -> list[MemberView]:
    """Replay the stored chain alone: the active member set after each block."""
    policy = ConsortiumPolicy(net.genesis)
    seen: list[MemberView] = []
    verify_chain(store, policy=policy, progress=lambda _: seen.append(view(policy.state.members)))
    return seen


async def warm_up(net: Network) -> None:
    """One final block first, so the membership change under test is not in block 1."""
    await net.submit_many("h0", [net.access("h0")])
    await net.settle()


def signers(store: SqliteChainStore, height: int) -> set[str]:
    return {s.signer for s in store.block(height).signatures}


def test_add_member_who_then_votes_and_anchors(network: MakeNetwork) -> None:
    net = network(4)
    new_key = SigningKey.generate()

    async def scenario(net: Network) -> tuple[int, int]:
        await net.start(*FOUNDERS)
        await warm_up(net)
        receipt = await net.members["h0"].submit(
            net.tx("member.add", add_body("h4", new_key), "h0", "h1", "h2"), timeout=5
        )
        added_at = receipt.height
        await net.settle()
        for member in net.members.values():
            assert [m.id for m in member.state.members.members] == [*FOUNDERS, "h4"]
            assert member.state.members.quorum == 4
        (h4,) = await net.start("h4", key=new_key)
        await h4.wait_final(added_at, timeout=10)
        assert h4.state.members.by_id("h4") is not None
        # h4 anchors its private chain.
        await net.write_private("h4", 4)
        anchor = await net.anchorers["h4"].anchor_once()
        assert anchor is not None
        await net.settle()
        for member in net.members.values():
            assert member.state.anchors["h4"].log_size == net.chains["h4"].head.log_size
        # With h3 down, 4 of 5 is exactly the quorum: every new block needs h4's vote.
        await net.stop("h3")
        before = net.members["h0"].final_height
        for via in ("h4", "h1"):
            await net.submit_many(via, [net.access("h4", "h0"), net.access("h2")])
        return before, await net.settle()

    before, final = net.run(scenario)
    store = net.open_store(net.consortium_path("h4"))
    assert final > before
    for height in range(before + 1, final + 1):
        assert new_key.fingerprint in signers(store, height)
    policy = ConsortiumPolicy(net.genesis)
    verify_chain(store, policy=policy)
    assert [m.id for m in policy.state.members.members] == [*FOUNDERS, "h4"]
    assert policy.state.anchors["h4"].log_size > 0


def _bad_signer_sets(net: Network, outsider: SigningKey) -> list[tuple[int, list[SigningKey]]]:
    """Signature sets short of the quorum of 3, with how many distinct members they count."""
    k = net.keys
    return [
        (2, [k["h0"], k["h1"]]),
        (1, [k["h0"], k["h0"], k["h0"]]),
        (2, [k["h0"], k["h1"], outsider]),
        (2, [k["h2"], k["h3"], k["h3"]]),
    ]


@pytest.mark.parametrize("tx_type", ["member.add", "member.remove", "member.rotate", "member.tls"])
def test_membership_change_without_quorum_is_refused(network: MakeNetwork, tx_type: str) -> None:
    net = network(4)
    outsider = SigningKey.generate()

    async def scenario(net: Network) -> list[bytes]:
        await net.start(*FOUNDERS)
        await warm_up(net)
        body = {
            "member.add": add_body("h4", outsider),
            "member.remove": {"id": "h3"},
            "member.rotate": rotate_body("h3", outsider),
            "member.tls": tls_body("h3"),
        }[tx_type]
        refused: list[bytes] = []
        for counted, keys in _bad_signer_sets(net, outsider):
            unsigned = Transaction(
                type=tx_type, chain=net.chain_id, body=body, time_ms=now_ms() + len(refused)
            )
            tx = Transaction(
                type=unsigned.type,
                chain=unsigned.chain,
                body=unsigned.body,
                time_ms=unsigned.time_ms,
                signatures=tuple(key.sign(unsigned.signing_bytes()) for key in keys),
            )
            with pytest.raises(
                InvalidSignature, match=f"needs 3 member signatures, has {counted}$"
            ):
                await net.members["h1"].submit(tx, timeout=5)
            refused.append(tx.hash())
        await net.submit_many("h0", [net.access("h0")])
        await net.settle()
        for member in net.members.values():
            assert [m.id for m in member.state.members.members] == list(FOUNDERS)
            assert member.state.members.members == net.genesis.members
        return refused

    refused = net.run(scenario)
    for mid in FOUNDERS:
        hashes = stored_tx_hashes(net.open_store(net.consortium_path(mid)))
        assert not set(refused) & set(hashes)


def test_membership_changes_that_make_no_sense_are_refused(network: MakeNetwork) -> None:
    net = network(4)

    async def scenario(net: Network) -> None:
        await net.start(*FOUNDERS)
        quorum = ("h0", "h1", "h2")
        cases = [
            ("member.add", add_body("h2", SigningKey.generate()), "already"),
            ("member.add", add_body("h9", net.keys["h1"]), "already"),
            ("member.add", {"member": {"id": "h9"}}, "exactly id, name"),
            ("member.remove", {"id": "h9"}, "not a member"),
            ("member.rotate", rotate_body("h9", SigningKey.generate()), "not a member"),
            ("member.rotate", rotate_body("h0", net.keys["h1"]), "already belongs"),
            ("member.rotate", {"id": "h0", "signing_key": "nothex"}, "not hex"),
            ("member.tls", tls_body("h9"), "not a member"),
            ("member.tls", {"id": "h0", "tls_cert": "nothex"}, "not hex"),
            ("member.tls", {"id": "h0", "tls_cert": "00"}, "not a DER X.509"),
        ]
        for tx_type, body, reason in cases:
            with pytest.raises(InvalidInput, match=reason):
                await net.members["h0"].submit(net.tx(tx_type, body, *quorum), timeout=5)
        for member in net.members.values():
            assert member.state.members.members == net.genesis.members

    net.run(scenario)


def test_removed_member_no_longer_votes_or_anchors(network: MakeNetwork) -> None:
    net = network(4)

    async def scenario(net: Network) -> int:
        await net.start(*FOUNDERS)
        await warm_up(net)
        await net.write_private("h3", 3)
        h3_anchorer = Anchorer(
            institution="h3", chain=net.chains["h3"], member=net.members["h0"], key=net.keys["h3"]
        )
        receipt = await net.members["h0"].submit(
            net.tx("member.remove", {"id": "h3"}, "h0", "h1", "h2"), timeout=5
        )
        removed_at = receipt.height
        await net.settle()
        for member in net.members.values():
            assert [m.id for m in member.state.members.members] == ["h0", "h1", "h2"]
            assert member.state.members.quorum == 2
        with pytest.raises(InvalidSignature, match="not a current member's"):
            await h3_anchorer.anchor_once()
        # Only h0 and the removed h3 running: h3's votes must not count.
        await net.stop("h1", "h2")
        h0 = net.members["h0"]
        pending = net.spawn(h0.submit(net.access("h0"), timeout=20))
        final = h0.final_height
        await wait_until(lambda: h0.status()["tip_height"] > final, "a block to be cut")
        await asyncio.sleep(0.2)
        assert h0.final_height == final and not pending.done()
        # One more current member: 2 of 3 is a quorum now (it was not with 4 members).
        await net.start("h1")
        receipt = await asyncio.wait_for(pending, 10)
        await net.settle("h0", "h1")
        return removed_at

    removed_at = net.run(scenario)
    store = net.open_store(net.consortium_path("h0"))
    verify_chain(store, policy=ConsortiumPolicy(net.genesis))
    head = store.head()
    assert head is not None
    h3_fp = net.keys["h3"].fingerprint
    for height in range(removed_at + 1, head.height + 1):
        assert h3_fp not in signers(store, height)
        assert len(signers(store, height)) >= 2


def test_rotated_key_replaces_the_old_one(network: MakeNetwork) -> None:
    net = network(4)
    new_key = SigningKey.generate()
    old_key = net.keys["h1"]

    async def scenario(net: Network) -> int:
        await net.start(*FOUNDERS)
        await warm_up(net)
        await net.write_private("h1", 3)
        receipt = await net.members["h0"].submit(
            net.tx("member.rotate", rotate_body("h1", new_key), "h0", "h2", "h3"), timeout=5
        )
        rotated_at = receipt.height
        await net.settle()
        for member in net.members.values():
            h1 = member.state.members.by_id("h1")
            assert h1 is not None and h1.signing_key == new_key.public
        with pytest.raises(InvalidSignature, match="not a current member's"):
            await net.anchorers["h1"].anchor_once()  # still signs with the old key
        new_anchorer = Anchorer(
            institution="h1", chain=net.chains["h1"], member=net.members["h1"], key=new_key
        )
        assert await new_anchorer.anchor_once() is not None
        # h1 restarts with its new key; with h3 down, its votes are needed.
        await net.stop("h1")
        await net.start("h1", key=new_key)
        await net.settle()
        await net.stop("h3")
        for via in ("h1", "h2"):
            await net.submit_many(via, [net.access("h1"), net.access("h0")])
        await net.settle()
        return rotated_at

    rotated_at = net.run(scenario)
    store = net.open_store(net.consortium_path("h2"))
    policy = ConsortiumPolicy(net.genesis)
    verify_chain(store, policy=policy)
    h1 = policy.state.members.by_id("h1")
    assert h1 is not None and h1.signing_key == new_key.public
    head = store.head()
    assert head is not None
    for height in range(rotated_at + 1, head.height + 1):
        assert old_key.fingerprint not in signers(store, height)
    assert new_key.fingerprint in signers(store, head.height)


def test_restarted_member_votes_with_its_rotated_key_on_a_pending_block(
    network: MakeNetwork,
) -> None:
    """The block cut right after a rotation got an old-key vote from the member's still
    running process (invalid now). Restarted with the new key, the member must be able
    to vote on that same block, or the block can only become final without it."""
    net = network(4)
    new_key = SigningKey.generate()

    async def scenario(net: Network) -> None:
        await net.start("h0", "h1", "h2")  # h3 is down: h1's vote is needed
        await warm_up(net)
        await net.members["h0"].submit(
            net.tx("member.rotate", rotate_body("h1", new_key), "h0", "h1", "h2"), timeout=5
        )
        h0 = net.members["h0"]
        final = await net.settle()
        pending = net.spawn(h0.submit(net.access("h0"), timeout=20))
        await wait_until(lambda: h0.status()["tip_height"] > final, "the next block to be cut")
        await asyncio.sleep(0.1)  # h1 (old key) has voted on it by now
        assert h0.final_height == final
        await net.stop("h1")
        await net.start("h1", key=new_key)
        receipt = await asyncio.wait_for(pending, 3)
        assert receipt.height == final + 1

    net.run(scenario)


def test_member_set_at_every_height_is_derivable_from_the_chain(network: MakeNetwork) -> None:
    net = network(4)
    h4_key, h1_key = SigningKey.generate(), SigningKey.generate()

    async def scenario(net: Network) -> dict[int, MemberView]:
        await net.start(*FOUNDERS)
        await warm_up(net)
        live: dict[int, MemberView] = {}
        steps = [
            ("member.add", add_body("h4", h4_key), ("h0", "h1", "h2")),
            ("member.rotate", rotate_body("h1", h1_key), ("h0", "h2", "h3", "h4")),
            ("member.remove", {"id": "h3"}, ("h0", "h2", "h3", "h4")),
            ("member.remove", {"id": "h4"}, ("h0", "h2", "h4")),
        ]
        for tx_type, body, by in steps:
            if tx_type == "member.rotate":
                await net.start("h4", key=h4_key)  # 5 members: 4 valid votes needed
            receipt = await net.members["h0"].submit(net.tx(tx_type, body, *by), timeout=5)
            await net.members["h0"].wait_final(receipt.height, timeout=5)
            live[receipt.height] = view(net.members["h0"].state.members)
            await net.submit_many("h2", [net.access("h2")])  # a block in between
        await net.settle("h0", "h2")
        final = view(net.members["h0"].state.members)
        live[net.members["h0"].final_height] = final
        assert [mid for mid, _ in final] == ["h0", "h1", "h2"]
        return live

    live = net.run(scenario)
    for mid in ("h0", "h2", "h3"):
        by_height = members_by_height(net, net.open_store(net.consortium_path(mid)))
        for height, members in live.items():
            if height < len(by_height):
                assert by_height[height] == members, (mid, height)
    h0_view = members_by_height(net, net.open_store(net.consortium_path("h0")))
    assert h0_view[0] == view(MemberSet(net.genesis.members))
    assert h0_view[-1] == live[max(live)]


@pytest.mark.parametrize("tx_type", ["member.remove", "member.add"])
def test_membership_change_in_block_one_is_certified_by_the_founders(
    network: MakeNetwork, tx_type: str
) -> None:
    """Block 1 is voted on by the genesis members, like every block by the members
    before it, even when it changes the membership (the auditor's rule)."""
    net = network(4)
    body = {"member.remove": {"id": "h3"}, "member.add": add_body("h4", SigningKey.generate())}

    async def scenario(net: Network) -> int:
        await net.start("h0", "h1", "h2")
        receipt = await net.members["h0"].submit(
            net.tx(tx_type, body[tx_type], "h0", "h1", "h2"), timeout=3
        )
        await net.settle()
        return receipt.height

    height = net.run(scenario)
    assert height == 1
    founders = MemberSet(net.genesis.members)
    for mid in ("h0", "h1", "h2"):
        store = net.open_store(net.consortium_path(mid))
        block = store.block(1)
        assert len(founders.quorum_signers(block.block_hash, block.signatures)) >= 3, mid
        verify_chain(store, policy=ConsortiumPolicy(net.genesis))


def test_state_is_final_state_before_the_first_final_block(network: MakeNetwork) -> None:
    """``member.state`` is documented as the state as of the last final block."""
    net = network(4)

    async def scenario(net: Network) -> None:
        await net.start("h0", "h1")  # 2 of 4: nothing becomes final
        h0 = net.members["h0"]
        await net.write_private("h0", 2)
        pending = net.spawn(net.anchorers["h0"].anchor_once())
        await wait_until(lambda: h0.status()["tip_height"] == 1, "block 1 to be cut")
        assert h0.final_height == 0
        not_final = dict(h0.state.anchors)
        await net.start("h2")
        assert await asyncio.wait_for(pending, 10) is not None
        assert h0.state.anchors["h0"].log_size == 3
        assert not_final == {}, "a non-final anchor was reported as final state"

    net.run(scenario)
