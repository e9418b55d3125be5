"""``ledger.consortium.followed``: an API worker follows the members the stored chain holds.

A worker does not run the consortium member; it trusts, at each TLS handshake,
the members after the newest block its parent stored. A member removed by the
consortium must stop being trusted there too, without a restart.
"""

from __future__ import annotations

from consortium_net import MakeNetwork, Network

from medledger.core.errors import NotFound
from medledger.ledger.consortium.followed import StoredMembership
from medledger.storage.ports import ChainStore

FOUNDERS = ("h0", "h1", "h2", "h3")


def _ids(follower: StoredMembership) -> list[str]:
    return [m.id for m in follower.members().members]


def test_a_removed_member_leaves_the_followed_membership_without_a_restart(
    network: MakeNetwork,
) -> None:
    net = network(4)

    async def scenario(net: Network) -> tuple[list[str], list[str], list[str], int]:
        await net.start(*FOUNDERS)
        await net.submit_many("h0", [net.access("h0")])
        await net.settle()
        # The worker's follower, reading h1's stored chain (h1's member writes it).
        follower = StoredMembership(net.genesis, lambda: net.open_store(net.consortium_path("h1")))
        before = _ids(follower)
        receipt = await net.members["h0"].submit(
            net.tx("member.remove", {"id": "h3"}, "h0", "h1", "h2"), timeout=5
        )
        await net.settle()
        after = _ids(follower)
        member_view = [m.id for m in net.members["h1"].state.members.members]
        assert follower.height >= receipt.height
        return before, after, member_view, follower.members().quorum

    before, after, member_view, quorum = net.run(scenario)
    assert before == list(FOUNDERS)
    assert after == ["h0", "h1", "h2"]
    assert after == member_view  # what the parent's member trusts
    assert quorum == 2


def test_before_the_chain_is_stored_the_genesis_members_are_followed(
    network: MakeNetwork,
) -> None:
    net = network(4)
    opened: list[int] = []

    def not_yet() -> ChainStore:
        opened.append(1)
        raise NotFound("no consortium chain stored yet")

    follower = StoredMembership(net.genesis, not_yet)
    assert follower.members().members == net.genesis.members
    follower.members()
    assert len(opened) == 2  # asked again at the next handshake: it may exist by then
    follower.close()
