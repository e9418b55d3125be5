"""Tests for :mod:`medledger.core.consortium`: quorums, genesis/member documents, member sets."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from medledger.core.consortium import (
    ConsortiumParams,
    Genesis,
    Member,
    MemberSet,
    consortium_chain_id,
    max_faulty,
    quorum,
)
from medledger.core.encoding import canonical_bytes, parse_canonical
from medledger.core.errors import InvalidInput
from medledger.core.hashing import sha256
from medledger.core.keys import SigningKey
from medledger.core.models import Transaction
from medledger.ledger.consortium.member import genesis_block
from medledger.ledger.consortium.verify import ConsortiumPolicy

# n -> (f, quorum), from f = ⌊(n-1)/3⌋ and quorum = ⌊(n+f)/2⌋+1 (DESIGN.md "Finality").
QUORUM_TABLE = {
    1: (0, 1),
    2: (0, 2),
    3: (0, 2),
    4: (1, 3),
    5: (1, 4),
    6: (1, 4),
    7: (2, 5),
    8: (2, 6),
    9: (2, 6),
    10: (3, 7),
}


@pytest.mark.parametrize(("n", "expected"), sorted(QUORUM_TABLE.items()))
def test_max_faulty_and_quorum_table(n: int, expected: tuple[int, int]) -> None:
    assert (max_faulty(n), quorum(n)) == expected


def test_quorums_intersect_in_an_honest_member_and_stay_reachable() -> None:
    for n in range(1, 301):
        f, q = max_faulty(n), quorum(n)
        assert 3 * f < n, n  # f < n/3
        assert 2 * q - n >= f + 1, n  # two quorums share at least one honest member
        assert q <= n - f, n  # the honest members alone can finalize
        assert q <= n


@pytest.mark.parametrize("n", [0, -1])
def test_no_members_is_refused(n: int) -> None:
    with pytest.raises(InvalidInput, match="at least one member"):
        max_faulty(n)
    with pytest.raises(InvalidInput, match="at least one member"):
        quorum(n)


def _members(n: int) -> tuple[list[SigningKey], tuple[Member, ...]]:
    keys = [SigningKey.generate() for _ in range(n)]
    members = tuple(
        Member(
            id=f"h{i}",
            name=f"Hospital {i}",
            signing_key=k.public,
            hpke_key="ab" * 16 if i == 0 else "",
            peer_url=f"https://h{i}.example" if i == 1 else "",
        )
        for i, k in enumerate(keys)
    )
    return keys, members


def _genesis() -> Genesis:
    _, members = _members(4)
    return Genesis(
        consortium="demo",
        time_ms=1_700_000_000_000,
        members=members,
        params=ConsortiumParams(max_block_txs=7, cut_after_ms=9, max_clock_skew_ms=1234),
    )


def test_genesis_json_round_trip() -> None:
    genesis = _genesis()
    doc = genesis.to_json()
    again = Genesis.from_json(parse_canonical(canonical_bytes(doc)))
    assert again == genesis
    assert again.to_json() == doc
    assert again.hash() == genesis.hash()
    assert again.chain_id == consortium_chain_id("demo") == "consortium:demo"
    assert [m.fingerprint for m in again.members] == [m.fingerprint for m in genesis.members]
    assert again.params.max_clock_skew_ms == 1234


def test_genesis_hash_changes_with_any_field() -> None:
    genesis = _genesis()
    base = genesis.hash()
    doc = genesis.to_json()
    mutations: list[Callable[[dict[str, Any]], object]] = [
        lambda d: d.update(consortium="other"),
        lambda d: d.update(time_ms=d["time_ms"] + 1),
        lambda d: d["params"].update(cut_after_ms=10),
        lambda d: d["members"][2].update(name="Renamed"),
    ]
    for mutate in mutations:
        changed = copy.deepcopy(doc)
        mutate(changed)
        assert Genesis.from_json(changed).hash() != base


def test_params_default_fields_and_round_trip() -> None:
    params = ConsortiumParams(max_block_txs=3)
    assert ConsortiumParams.from_json(params.to_json()) == params
    # Omitted fields take their defaults, except the anchor-round rule: a document
    # written before it existed keeps the old rule (and is written back without it).
    old = ConsortiumParams.from_json({"cut_after_ms": 7})
    assert old == ConsortiumParams(cut_after_ms=7, anchor_round_cut=False, anchor_idle_notice=False)
    assert old.to_json() == {"cut_after_ms": 7}
    assert ConsortiumParams().to_json()["anchor_round_cut"] is True
    assert ConsortiumParams().to_json()["anchor_idle_notice"] is True
    for name in ("anchor_round_cut", "anchor_idle_notice"):
        for value in (True, False):
            written = ConsortiumParams.from_json({name: value})
            assert getattr(written, name) is value
            assert written.to_json() == {name: value}
    # A genesis written after anchor rounds but before idle notices keeps them off.
    rounds_only = ConsortiumParams.from_json({"anchor_round_cut": True})
    assert rounds_only.anchor_round_cut and not rounds_only.anchor_idle_notice


@pytest.mark.parametrize("name", ["anchor_round_cut", "anchor_idle_notice"])
@pytest.mark.parametrize("value", [1, 0, "true", None, [True]])
def test_params_switches_must_be_booleans(name: str, value: object) -> None:
    with pytest.raises(InvalidInput, match=f"{name} must be true or false"):
        ConsortiumParams.from_json({name: value})


def test_member_json_round_trip() -> None:
    _, members = _members(2)
    for member in members:
        assert Member.from_json(member.to_json()) == member


def _member_doc() -> dict[str, Any]:
    return _members(1)[1][0].to_json()


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d.pop("peer_url"), "exactly id, name, signing_key"),
        (lambda d: d.pop("signing_key"), "exactly id, name, signing_key"),
        (lambda d: d.update(extra="x"), "exactly id, name, signing_key"),
        (lambda d: d.update(id=""), "id non-empty"),
        (lambda d: d.update(id=5), "must be strings"),
        (lambda d: d.update(hpke_key=None), "must be strings"),
        (lambda d: d.update(signing_key="zz-not-hex"), "not hex"),
        (lambda d: d.update(signing_key="00" * 10), "DER public key"),
    ],
)
def test_member_bad_shapes_are_refused(mutate: Any, reason: str) -> None:
    doc = _member_doc()
    mutate(doc)
    with pytest.raises(InvalidInput, match=reason):
        Member.from_json(doc)


def test_member_must_be_an_object() -> None:
    with pytest.raises(InvalidInput):
        Member.from_json(["h0"])


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d.pop("params"), "exactly consortium, time_ms, params, members"),
        (lambda d: d.pop("members"), "exactly consortium, time_ms, params, members"),
        (lambda d: d.update(extra=1), "exactly consortium, time_ms, params, members"),
        (lambda d: d.update(consortium=7), "consortium must be a string"),
        (lambda d: d.update(consortium=""), "consortium id"),
        (lambda d: d.update(time_ms="1"), "time_ms an integer"),
        (lambda d: d.update(members={}), "members must be a list"),
        (lambda d: d.update(members=[]), "at least one member"),
        (lambda d: d["members"].append(copy.deepcopy(d["members"][0])), "distinct ids"),
        (lambda d: d["members"][1].update(id=d["members"][0]["id"]), "distinct ids"),
        (
            lambda d: d["members"][1].update(signing_key=d["members"][0]["signing_key"]),
            "distinct ids and keys",
        ),
        (lambda d: d["members"][3].pop("name"), "exactly id, name"),
        (lambda d: d["members"][2].update(signing_key="not hex!"), "not hex"),
        (lambda d: d["params"].update(unknown=1), "unknown fields"),
        (lambda d: d["params"].update(cut_after_ms=0), "positive integers"),
        (lambda d: d["params"].update(max_block_txs=True), "positive integers"),
        (lambda d: d.update(params=[]), "unknown fields"),
    ],
)
def test_genesis_bad_shapes_are_refused(mutate: Any, reason: str) -> None:
    doc = copy.deepcopy(_genesis().to_json())
    mutate(doc)
    with pytest.raises(InvalidInput, match=reason):
        Genesis.from_json(doc)


@pytest.mark.parametrize("time_ms", [True, -1])
def test_genesis_time_must_be_a_non_negative_integer(time_ms: Any) -> None:
    """Every other time in the formats is a non-negative integer (never a bool)."""
    doc = _genesis().to_json()
    doc["time_ms"] = time_ms
    with pytest.raises(InvalidInput):
        Genesis.from_json(doc)


def test_genesis_constructor_checks_distinct_ids_and_keys() -> None:
    keys, members = _members(2)
    with pytest.raises(InvalidInput, match="distinct"):
        Genesis(consortium="c", time_ms=1, members=(members[0], members[0]))
    twin = Member(id="other", name="Other", signing_key=keys[0].public)
    with pytest.raises(InvalidInput, match="distinct"):
        Genesis(consortium="c", time_ms=1, members=(members[0], twin))
    with pytest.raises(InvalidInput):
        Genesis(consortium="c", time_ms=1, members=())


def test_member_set_lookups_and_quorum() -> None:
    keys, members = _members(4)
    ms = MemberSet(members)
    assert ms.quorum == 3
    assert ms.by_id("h2") is members[2]
    assert ms.by_fingerprint(keys[3].fingerprint) is members[3]
    assert ms.by_id("nobody") is None
    assert ms.by_fingerprint(SigningKey.generate().fingerprint) is None


def test_member_set_with_member() -> None:
    keys, members = _members(4)
    ms = MemberSet(members)
    new_key = SigningKey.generate()
    new = Member(id="h4", name="New", signing_key=new_key.public)
    bigger = ms.with_member(new)
    assert [m.id for m in bigger.members] == ["h0", "h1", "h2", "h3", "h4"]
    assert bigger.quorum == 4
    assert ms.quorum == 3 and len(ms.members) == 4  # the original is unchanged
    with pytest.raises(InvalidInput, match="already"):
        bigger.with_member(Member(id="h4", name="Dup id", signing_key=SigningKey.generate().public))
    with pytest.raises(InvalidInput, match="already"):
        bigger.with_member(Member(id="h9", name="Dup key", signing_key=keys[1].public))


def test_member_set_without() -> None:
    _, members = _members(4)
    ms = MemberSet(members)
    smaller = ms.without("h1")
    assert [m.id for m in smaller.members] == ["h0", "h2", "h3"]
    assert smaller.quorum == 2
    with pytest.raises(InvalidInput, match="not a member"):
        smaller.without("h1")
    single = MemberSet(members[:1])
    with pytest.raises(InvalidInput, match="last member"):
        single.without("h0")


def test_member_set_rotated() -> None:
    keys, members = _members(4)
    ms = MemberSet(members)
    new_key = SigningKey.generate()
    rotated = ms.rotated("h0", new_key.public)
    h0 = rotated.by_id("h0")
    assert h0 is not None
    assert h0.signing_key == new_key.public
    assert h0.hpke_key == members[0].hpke_key  # kept when not given
    assert h0.name == members[0].name
    assert rotated.by_fingerprint(keys[0].fingerprint) is None
    assert rotated.by_fingerprint(new_key.fingerprint) is h0
    assert [m.id for m in rotated.members] == ["h0", "h1", "h2", "h3"]  # order kept
    assert rotated.members[1:] == ms.members[1:]
    replaced = ms.rotated("h0", new_key.public, "cd" * 16)
    assert replaced.members[0].hpke_key == "cd" * 16
    with pytest.raises(InvalidInput, match="not a member"):
        ms.rotated("h9", new_key.public)
    with pytest.raises(InvalidInput, match="already belongs"):
        ms.rotated("h0", keys[2].public)


def test_quorum_signers_counts_distinct_valid_current_members() -> None:
    keys, members = _members(4)
    ms = MemberSet(members)
    message = b"\x11" * 32
    outsider = SigningKey.generate()
    sigs = [
        keys[0].sign(message),
        keys[0].sign(message),  # a duplicate counts once
        keys[1].sign(b"other message"),  # over other bytes: not counted
        outsider.sign(message),  # not a member: not counted
        keys[2].sign(message),
    ]
    assert ms.quorum_signers(message, sigs) == {"h0", "h2"}
    assert ms.quorum_signers(message, []) == set()
    rotated = ms.rotated("h2", outsider.public)
    assert rotated.quorum_signers(message, sigs) == {"h0", "h2"}  # h2 now signs with the new key
    assert rotated.quorum_signers(message, [keys[2].sign(message)]) == set()


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"max_block_txs": 7},
        # A genesis written before max_clock_skew_ms existed (block time, decision 0018).
        {"max_block_txs": 500, "max_block_bytes": 1048576, "cut_after_ms": 20,
         "anchor_interval_ms": 200},
        {"cut_after_ms": 9, "mode": "hybrid"},
    ],
)  # fmt: skip
def test_a_genesis_without_some_params_is_block_0_as_written(params: dict[str, Any]) -> None:
    """Omitted params take their defaults, but block 0 carries the document as written:
    a consortium whose genesis predates a parameter still verifies (it was refused)."""
    doc = {**_genesis().to_json(), "params": params}
    genesis = Genesis.from_json(doc)
    assert genesis.to_json() == doc
    assert genesis.hash() == sha256(canonical_bytes(doc))
    block = genesis_block(genesis)
    assert Transaction.decode(block.tx_data[0]).body == doc
    assert genesis.params.max_clock_skew_ms == params.get("max_clock_skew_ms", 30_000)
    policy = ConsortiumPolicy(Genesis.from_json(doc))
    policy.transaction(0, 0, Transaction.decode(block.tx_data[0]))  # block 0 is this genesis
