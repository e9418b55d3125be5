"""Bad consortium transactions: refused with a clear reason, never in a block.

Each case is refused twice: by ``submit`` (early check, or the authoritative
check on the ordered copy), and when published straight to the orderer —
then every member's own check must drop it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from consortium_net import (
    MakeNetwork,
    Network,
    publish_tx,
    sign_tx,
    stored_tx_hashes,
    vote_payload,
)

from medledger.core.errors import InvalidInput, InvalidSignature, MedledgerError
from medledger.core.keys import SigningKey
from medledger.core.models import BlockHeader, Transaction
from medledger.ledger.consortium.rules import MAX_CONSORTIUM_TX_BYTES
from medledger.ledger.consortium.verify import ConsortiumPolicy
from medledger.ledger.ordering.port import MAX_MESSAGE_BYTES
from medledger.ledger.verify import verify_chain

OUTSIDER = SigningKey.generate()


def unsigned(net: Network) -> Transaction:
    return net.tx("access", net.access_body("h1"))


def outsider_key_for_member(net: Network) -> Transaction:
    tx = net.tx("access", net.access_body("h1"))
    return sign_tx(tx, OUTSIDER)


def member_key_over_other_bytes(net: Network) -> Transaction:
    tx = net.tx("access", net.access_body("h1"))
    other = net.tx("access", net.access_body("h1"))
    return Transaction(
        type=tx.type,
        chain=tx.chain,
        body=tx.body,
        time_ms=tx.time_ms,
        signatures=(net.keys["h1"].sign(other.signing_bytes()),),
    )


def two_signatures(net: Network) -> Transaction:
    tx = net.tx("access", net.access_body("h1"))
    return sign_tx(tx, net.keys["h1"], net.keys["h2"])


def oversized(net: Network) -> Transaction:
    body = net.access_body("h1")
    body["resource"] = "Observation/" + "x" * 300_000  # > MAX_MESSAGE_BYTES // 2
    return net.tx("access", body, "h1")


def over_the_rules_limit(net: Network) -> Transaction:
    """Small enough for the orderer, too large for the consortium rules (every member)."""
    body = net.access_body("h1")
    body["resource"] = "Observation/" + "x" * (MAX_CONSORTIUM_TX_BYTES + 1)
    tx = net.tx("access", body, "h1")
    assert MAX_CONSORTIUM_TX_BYTES < len(tx.encode()) < MAX_MESSAGE_BYTES // 2
    return tx


def unknown_type(net: Network) -> Transaction:
    return net.tx("record.put", {"id": "Observation/1"}, "h1")


def non_member_signer(net: Network) -> Transaction:
    tx = net.tx("access", net.access_body("intruder", holder="h0"))
    return sign_tx(tx, OUTSIDER)


def signed_by_reader_not_holder(net: Network) -> Transaction:
    return net.tx("access", net.access_body("h2", holder="h1"), "h2")


def wrong_chain(net: Network) -> Transaction:
    return net.tx("access", net.access_body("h1"), "h1", chain="consortium:other")


def private_chain_id(net: Network) -> Transaction:
    return net.tx("access", net.access_body("h1"), "h1", chain="private:h1")


def stale(net: Network) -> Transaction:
    head = net.stores["h0"].head()
    assert head is not None
    last_block_time = BlockHeader.decode(head.header_bytes).time_ms
    skew = net.genesis.params.max_clock_skew_ms
    return net.tx("access", net.access_body("h1"), "h1", time_ms=last_block_time - skew - 1)


def bad_outcome(net: Network) -> Transaction:
    body = net.access_body("h1")
    body["outcome"] = "maybe"
    return net.tx("access", body, "h1")


CASES: dict[str, tuple[Callable[[Network], Transaction], type[MedledgerError], str]] = {
    "unsigned": (unsigned, InvalidSignature, "must be signed"),
    "outsider-key": (outsider_key_for_member, InvalidSignature, "not a current member's"),
    "over-other-bytes": (member_key_over_other_bytes, InvalidSignature, "does not verify"),
    "two-signatures": (two_signatures, InvalidSignature, "exactly one signature"),
    "oversized": (oversized, InvalidInput, "too large"),
    "over-the-rules-limit": (
        over_the_rules_limit,
        InvalidInput,
        f"exceeds the limit of {MAX_CONSORTIUM_TX_BYTES}",
    ),
    "unknown-type": (unknown_type, InvalidInput, "unknown consortium transaction type"),
    "non-member-signer": (non_member_signer, InvalidSignature, "not a current member's"),
    "signed-by-reader-not-holder": (signed_by_reader_not_holder, InvalidSignature, "signed by"),
    "wrong-chain": (wrong_chain, InvalidInput, "names chain 'consortium:other'"),
    "private-chain-id": (private_chain_id, InvalidInput, "names chain 'private:h1'"),
    "bad-outcome": (bad_outcome, InvalidInput, "outcome"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_transaction_is_refused_and_never_in_a_block(network: MakeNetwork, case: str) -> None:
    make, error, reason = CASES[case]
    net = network(4)

    async def scenario(net: Network) -> bytes:
        await net.start("h0", "h1", "h2", "h3")
        await net.submit_many("h0", [net.access("h0")])
        await net.settle()
        bad = make(net)
        with pytest.raises(error, match=reason):
            await net.members["h1"].submit(bad, timeout=5)
        # Bypass submit: straight into the order, then a good tx to cut a block after it.
        await publish_tx(net.orderer, bad)
        receipt = (await net.submit_many("h2", [net.access("h2")]))[0]
        await net.settle()
        for member in net.members.values():
            assert member.final_height >= receipt.height
            assert bad.hash() not in member.state.seen, (
                f"{member.member_id} accepted the refused tx from the order"
            )
        return bad.hash()

    bad_hash = net.run(scenario)
    for mid in ("h0", "h1", "h2", "h3"):
        store = net.open_store(net.consortium_path(mid))
        assert bad_hash not in stored_tx_hashes(store), f"{mid} put a refused tx in a block"
        verify_chain(store, policy=ConsortiumPolicy(net.genesis))


def test_replayed_transaction_is_refused(network: MakeNetwork) -> None:
    net = network(4)

    async def scenario(net: Network) -> bytes:
        await net.start("h0", "h1", "h2", "h3")
        tx = net.access("h3")
        first = await net.members["h3"].submit(tx, timeout=5)
        await net.settle()
        for via in ("h3", "h0"):
            with pytest.raises(InvalidInput, match="replay"):
                await net.members[via].submit(tx, timeout=5)
        # Re-published under new message ids (so the orderer's de-duplication cannot help).
        await publish_tx(net.orderer, tx, "replay-1")
        await publish_tx(net.orderer, tx, "replay-2")
        await net.submit_many("h1", [net.access("h1")])
        await net.settle()
        assert first.height >= 1
        return tx.hash()

    tx_hash = net.run(scenario)
    for mid in ("h0", "h1", "h2", "h3"):
        store = net.open_store(net.consortium_path(mid))
        assert stored_tx_hashes(store).count(tx_hash) == 1
        verify_chain(store, policy=ConsortiumPolicy(net.genesis))


def test_the_same_transaction_twice_in_one_block_is_kept_once(network: MakeNetwork) -> None:
    net = network(4)

    async def scenario(net: Network) -> bytes:
        await net.start("h0", "h1", "h2", "h3")
        tx = net.access("h2")
        await publish_tx(net.orderer, tx, "dup-1")
        await publish_tx(net.orderer, tx, "dup-2")
        await net.submit_many("h1", [net.access("h1")])
        await net.settle()
        return tx.hash()

    tx_hash = net.run(scenario)
    for mid in ("h0", "h1", "h2", "h3"):
        store = net.open_store(net.consortium_path(mid))
        assert stored_tx_hashes(store).count(tx_hash) == 1
        verify_chain(store, policy=ConsortiumPolicy(net.genesis))


def test_garbage_messages_in_the_order_are_ignored(network: MakeNetwork) -> None:
    net = network(4)

    async def scenario(net: Network) -> None:
        await net.start("h0", "h1", "h2", "h3")
        genesis_header = BlockHeader.decode(net.stores["h0"].block(0).header_bytes)
        for i, payload in enumerate(
            [
                b"not json",
                b"[1,2,3]",
                b'{"kind":"mystery"}',
                b'{"kind":"tx","tx":{"type":"access"}}',
                b'{"height":"one","kind":"cut","signature":{}}',
                b'{"height":1,"kind":"cut"}',
                b'{"header":{"height":1},"kind":"vote","signature":{}}',
                b'{"block_hash":"zz","height":1,"kind":"vote","signature":{}}',  # the old format
                vote_payload(genesis_header, net.keys["h0"].sign(genesis_header.hash())),
            ]
        ):
            await net.orderer.publish(f"garbage-{i}", payload)
        receipts = await net.submit_many("h0", [net.access("h0") for _ in range(3)])
        assert all(r.height >= 1 for r in receipts)
        await net.settle()
        for member in net.members.values():
            assert not member.evidence

    net.run(scenario)
    verify_chain(net.open_store(net.consortium_path("h1")), policy=ConsortiumPolicy(net.genesis))
