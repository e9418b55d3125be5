"""An in-process consortium for tests: N members on one ``SoloOrderer``.

Every member has a consortium ``SqliteChainStore`` and, on demand, a private
chain and an :class:`Anchorer`, all under one directory. A :class:`Network`
is driven from one ``asyncio.run`` (:meth:`Network.run`); its stores stay
open afterwards for synchronous inspection and are closed by the fixture.
(Imported by name: pytest puts this folder on ``sys.path``.)

Raw messages for Byzantine tests are built here in the wire formats of
``ledger.consortium.member``: a vote carries the header it signs (``vote_payload``), a
cut marker is signed by a member over ``marker_bytes`` (``marker_payload``), an
idle notice over ``idle_notice_bytes`` (``idle_payload``).
Tasks a scenario starts go through :meth:`Network.spawn`, so they are always
awaited or cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from medledger.core.consortium import ConsortiumParams, Genesis, Member
from medledger.core.encoding import canonical_bytes, parse_canonical
from medledger.core.errors import MedledgerError
from medledger.core.hashing import sha256
from medledger.core.keys import SigningKey
from medledger.core.models import BlockHeader, Signature, Transaction
from medledger.ledger.anchoring import Anchorer
from medledger.ledger.clock import Clock, SystemClock
from medledger.ledger.consortium.member import ConsortiumMember
from medledger.ledger.ordering.port import OrderedMessage, Orderer
from medledger.ledger.ordering.solo import SoloOrderer
from medledger.ledger.private import PrivateChain
from medledger.storage.sqlite.chain import SqliteChainStore

__all__ = [
    "FAST",
    "FakeMonotonic",
    "MakeNetwork",
    "Network",
    "VoteRewriter",
    "fake_header",
    "idle_notice_bytes",
    "idle_payload",
    "marker_bytes",
    "marker_payload",
    "now_ms",
    "order_messages",
    "publish_marker",
    "publish_tx",
    "publish_vote",
    "sign_tx",
    "stored_tx_hashes",
    "vote_payload",
    "votes_in_order",
    "wait_until",
]

T = TypeVar("T")

#: Fast block cutting so a whole scenario takes a fraction of a second.
FAST = ConsortiumParams(cut_after_ms=5)


def now_ms() -> int:
    return SystemClock().now_ms()


def sign_tx(tx: Transaction, *keys: SigningKey) -> Transaction:
    """``tx`` with its signatures replaced by ``keys``' signatures over its signing bytes."""
    return Transaction(
        type=tx.type,
        chain=tx.chain,
        body=tx.body,
        time_ms=tx.time_ms,
        signatures=tuple(k.sign(tx.signing_bytes()) for k in keys),
    )


def stored_tx_hashes(store: SqliteChainStore) -> list[bytes]:
    """Hashes of every transaction in every stored block, in log order."""
    return [sha256(data) for block in store.iter_blocks() for data in block.tx_data]


async def wait_until(pred: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


async def publish_tx(orderer: Orderer, tx: Transaction, msg_id: str | None = None) -> int:
    """Put ``tx`` straight into the order, bypassing ``ConsortiumMember.submit``."""
    envelope = canonical_bytes({"kind": "tx", "tx": tx.to_json()})
    return await orderer.publish(msg_id or f"raw-{tx.hash().hex()}", envelope)


def vote_payload(header: BlockHeader, signature: Signature) -> bytes:
    """A vote message: the header travels with the signature over its hash."""
    return canonical_bytes(
        {"kind": "vote", "header": header.to_json(), "signature": signature.to_json()}
    )


async def publish_vote(
    orderer: Orderer, header: BlockHeader, signature: Signature, msg_id: str
) -> int:
    """Put a vote for ``header`` carrying ``signature`` straight into the order."""
    return await orderer.publish(msg_id, vote_payload(header, signature))


def marker_bytes(chain_id: str, height: int) -> bytes:
    """What a member signs to ask for a cut at ``height`` (the fixed format)."""
    return canonical_bytes({"chain": chain_id, "kind": "cut", "height": height})


def idle_notice_bytes(chain_id: str, height: int, time_ms: int) -> bytes:
    """What a member signs to say it had nothing to anchor at ``time_ms``, for block
    ``height`` (the fixed format)."""
    return canonical_bytes(
        {"chain": chain_id, "kind": "idle", "height": height, "time_ms": time_ms}
    )


def idle_payload(
    chain_id: str,
    height: Any,
    key: SigningKey | None,
    *,
    time_ms: Any = None,
    signed: bytes | None = None,
) -> bytes:
    """An idle notice for ``height`` at ``time_ms`` (default: now) signed by ``key``
    (``None``: unsigned). ``signed``: the bytes to sign instead of the notice's own."""
    time_ms = now_ms() if time_ms is None else time_ms
    doc: dict[str, Any] = {"kind": "idle", "height": height, "time_ms": time_ms}
    if key is not None:
        own = signed or idle_notice_bytes(chain_id, height, time_ms)
        doc["signature"] = key.sign(own).to_json()
    return canonical_bytes(doc)


def marker_payload(
    chain_id: str, height: int, key: SigningKey | None, *, signed_chain: str | None = None
) -> bytes:
    """A cut marker for ``height``, signed by ``key`` (``None``: unsigned).

    ``signed_chain`` signs the marker bytes of another chain instead.
    """
    doc: dict[str, Any] = {"kind": "cut", "height": height}
    if key is not None:
        doc["signature"] = key.sign(marker_bytes(signed_chain or chain_id, height)).to_json()
    return canonical_bytes(doc)


async def publish_marker(
    orderer: Orderer,
    chain_id: str,
    height: int,
    key: SigningKey | None,
    msg_id: str,
    *,
    signed_chain: str | None = None,
) -> int:
    payload = marker_payload(chain_id, height, key, signed_chain=signed_chain)
    return await orderer.publish(msg_id, payload)


async def order_messages(orderer: Orderer) -> list[tuple[int, bytes]]:
    """Every message in the order so far, as ``(seq, payload)``."""
    last = await orderer.last_seq()
    out: list[tuple[int, bytes]] = []
    if last == 0:
        return out
    reader = orderer.read(1)
    try:
        async for msg in reader:
            out.append((msg.seq, msg.payload))
            if msg.seq >= last:
                break
    finally:
        aclose = getattr(reader, "aclose", None)
        if aclose is not None:
            await aclose()
    return out


async def votes_in_order(orderer: Orderer) -> list[tuple[bytes, BlockHeader, Signature]]:
    """Every well-formed vote in the order: ``(payload, header, signature)``."""
    votes = []
    for _, payload in await order_messages(orderer):
        try:
            doc = parse_canonical(payload)
        except MedledgerError:
            continue
        if isinstance(doc, dict) and doc.get("kind") == "vote":
            header = BlockHeader.from_json(doc["header"])
            votes.append((payload, header, Signature.from_json(doc["signature"])))
    return votes


def fake_header(header: BlockHeader, tag: str) -> BlockHeader:
    """Another block at the same height of the same chain (its transactions differ)."""
    return replace(header, tx_root=sha256(tag.encode() + header.tx_root))


class OrdererWrapper:
    """An orderer that passes everything to ``inner``; subclasses change what a test needs.

    ``close`` leaves ``inner`` open: its owner (the network) closes it.
    """

    def __init__(self, inner: Orderer) -> None:
        self._inner = inner

    async def publish(self, msg_id: str, payload: bytes) -> int:
        return await self._inner.publish(msg_id, payload)

    async def broadcast(self, payload: bytes) -> None:
        await self._inner.broadcast(payload)

    def broadcasts(self) -> AsyncIterator[bytes]:
        return self._inner.broadcasts()

    def read(self, start: int = 1) -> AsyncIterator[OrderedMessage]:
        return self._inner.read(start)

    async def last_seq(self) -> int:
        return await self._inner.last_seq()

    async def close(self) -> None:
        return None


class VoteRewriter(OrdererWrapper):
    """The orderer as one Byzantine member sees it: its votes are rewritten on the way out.

    Modes: ``fake-only`` (a vote for another header at the same height instead of
    the real one), ``fake-then-real`` / ``real-then-fake`` (both, in that order) and
    ``two-fakes`` (two different wrong headers, never the real one). The votes are
    validly signed with the member's real key over each header's hash.
    """

    def __init__(self, inner: Orderer, key: SigningKey, mode: str) -> None:
        self._inner = inner
        self._key = key
        self._mode = mode
        self.fakes: dict[int, list[BlockHeader]] = {}

    async def publish(self, msg_id: str, payload: bytes) -> int:
        if not msg_id.startswith("vote-"):
            return await self._inner.publish(msg_id, payload)
        vote = parse_canonical(payload)
        real = BlockHeader.from_json(vote["header"])
        plan = self._plan(real)
        self.fakes[real.height] = [h for h in plan if h != real]
        seq = 0
        for i, header in enumerate(plan):
            seq = await publish_vote(
                self._inner, header, self._key.sign(header.hash()), f"{msg_id}-{i}"
            )
        return seq

    async def broadcast(self, payload: bytes) -> None:
        # The member broadcasts each vote beside the order: rewritten the same way.
        vote = parse_canonical(payload)
        if vote.get("kind") != "vote":
            await self._inner.broadcast(payload)
            return
        for header in self._plan(BlockHeader.from_json(vote["header"])):
            await self._inner.broadcast(vote_payload(header, self._key.sign(header.hash())))

    def _plan(self, real: BlockHeader) -> list[BlockHeader]:
        fake1, fake2 = fake_header(real, "fake-1"), fake_header(real, "fake-2")
        return {
            "fake-only": [fake1],
            "fake-then-real": [fake1, real],
            "real-then-fake": [real, fake1],
            "two-fakes": [fake1, fake2],
        }[self._mode]


class Network:
    """``n`` founding members ``h0``…``h{n-1}`` sharing one ``SoloOrderer``."""

    def __init__(self, directory: Path, n: int = 4, params: ConsortiumParams = FAST) -> None:
        self.directory = directory
        self.keys: dict[str, SigningKey] = {f"h{i}": SigningKey.generate() for i in range(n)}
        self.genesis = Genesis(
            consortium="test",
            time_ms=now_ms() - 1000,
            members=tuple(
                Member(id=mid, name=f"Hospital {mid}", signing_key=k.public)
                for mid, k in self.keys.items()
            ),
            params=params,
        )
        self.orderer = SoloOrderer()
        self.members: dict[str, ConsortiumMember] = {}
        self.stores: dict[str, SqliteChainStore] = {}
        self.chains: dict[str, PrivateChain] = {}
        self.anchorers: dict[str, Anchorer] = {}
        self._all_stores: list[SqliteChainStore] = []
        self._extra_chains: list[PrivateChain] = []
        self._extra_orderers: list[Orderer] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._seq = itertools.count()

    @property
    def chain_id(self) -> str:
        return self.genesis.chain_id

    def consortium_path(self, member_id: str) -> Path:
        return self.directory / f"{member_id}-consortium.db"

    def evidence_path(self, member_id: str) -> Path:
        return self.directory / f"{member_id}-evidence.jsonl"

    def create_store(self, path: Path, chain_id: str) -> SqliteChainStore:
        """A new chain database (closed at teardown)."""
        store = SqliteChainStore.create(path, chain_id)
        self._all_stores.append(store)
        return store

    def open_store(self, path: Path) -> SqliteChainStore:
        """A new handle on an existing chain database (closed at teardown)."""
        store = SqliteChainStore.open(path)
        self._all_stores.append(store)
        return store

    # -- members -----------------------------------------------------------------

    async def start(
        self,
        *member_ids: str,
        key: SigningKey | None = None,
        orderer: Orderer | None = None,
        evidence: bool = False,
        clock: Clock | None = None,
        monotonic: Callable[[], float] | None = None,
    ) -> list[ConsortiumMember]:
        """Start members (new store, or the member's existing store on a restart).

        With ``evidence``, each member appends equivocation evidence to
        :meth:`evidence_path`. ``clock`` is the members' clock (default: the system's),
        ``monotonic`` their monotonic clock (default: ``time.monotonic``).
        """
        started = []
        for mid in member_ids:
            assert mid not in self.members, f"{mid} is already running"
            if key is not None:
                self.keys[mid] = key
            elif mid not in self.keys:
                self.keys[mid] = SigningKey.generate()
            path = self.consortium_path(mid)
            if path.exists():
                store = self.open_store(path)
            else:
                store = self.create_store(path, self.chain_id)
            member = ConsortiumMember(
                genesis=self.genesis,
                member_id=mid,
                key=self.keys[mid],
                orderer=orderer or self.orderer,
                store=store,
                evidence_path=self.evidence_path(mid) if evidence else None,
                clock=clock,
                monotonic=monotonic,
            )
            await member.start()
            self.members[mid], self.stores[mid] = member, store
            if mid in self.anchorers:
                self.anchorers[mid] = Anchorer(
                    institution=mid, chain=self.chains[mid], member=member, key=self.keys[mid]
                )
            started.append(member)
        return started

    async def stop(self, *member_ids: str) -> None:
        """Crash-stop members: their tasks end; their stores stay on disk."""
        for mid in member_ids:
            member = self.members.pop(mid)
            await member.close()
            self.stores.pop(mid).close()

    def private_chain(self, member_id: str) -> PrivateChain:
        """The member's private chain and an Anchorer wired to its running consortium member."""
        if member_id not in self.chains:
            chain_id = f"private:{member_id}"
            store = self.create_store(self.directory / f"{member_id}-private.db", chain_id)
            self.chains[member_id] = PrivateChain.create(
                store,
                self.keys[member_id],
                chain_id=chain_id,
                institution=member_id,
                name=f"Hospital {member_id}",
            )
            self.anchorers[member_id] = Anchorer(
                institution=member_id,
                chain=self.chains[member_id],
                member=self.members[member_id],
                key=self.keys[member_id],
            )
        return self.chains[member_id]

    async def write_private(self, member_id: str, count: int, tag: str = "w") -> None:
        chain = self.private_chain(member_id)
        await asyncio.gather(
            *(chain.submit("record.put", {"tag": tag, "i": i}) for i in range(count))
        )

    async def rewritten_private(self, member_id: str, count: int) -> PrivateChain:
        """Another history of the member's private chain: same chain id, same key."""
        chain_id = f"private:{member_id}"
        n = len(self._extra_chains)
        store = self.create_store(self.directory / f"{member_id}-private-rewrite-{n}.db", chain_id)
        chain = PrivateChain.create(
            store,
            self.keys[member_id],
            chain_id=chain_id,
            institution=member_id,
            name=f"Hospital {member_id}",
        )
        self._extra_chains.append(chain)
        for i in range(count):  # one block each: the rewrite is also taller
            await chain.submit("record.put", {"tag": "forged", "i": i})
        return chain

    def file_orderer(self, clock: Clock | None = None) -> SoloOrderer:
        """A handle on this network's shared solo order *file* (as one node process would
        open it), stamping its publishes with ``clock``; closed by :meth:`aclose`."""
        orderer = SoloOrderer(self.directory / "order.db", clock=clock)
        self._extra_orderers.append(orderer)
        return orderer

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """A background task of the scenario: cancelled and awaited by :meth:`aclose`,
        so a scenario that fails early leaves no unretrieved exception behind."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        return task

    # -- transactions --------------------------------------------------------------

    def tx(
        self,
        tx_type: str,
        body: dict[str, Any],
        *signers: str,
        time_ms: int | None = None,
        chain: str | None = None,
    ) -> Transaction:
        unsigned = Transaction(
            type=tx_type,
            chain=chain or self.chain_id,
            body=body,
            time_ms=now_ms() if time_ms is None else time_ms,
        )
        return sign_tx(unsigned, *(self.keys[s] for s in signers))

    def access_body(self, reader: str, holder: str | None = None) -> dict[str, Any]:
        n = next(self._seq)
        return {
            "reader": reader,
            "holder": holder or reader,
            "patient": sha256(f"patient-{n}".encode()).hex(),
            "consent": "",
            "resource": f"Observation/{n}",
            "outcome": "allowed",
        }

    def access(self, reader: str, holder: str | None = None) -> Transaction:
        """A valid ``access`` tx signed by its holder (``reader`` unless given)."""
        return self.tx("access", self.access_body(reader, holder), holder or reader)

    async def submit_many(self, via: str, txs: Iterable[Transaction]) -> list[Any]:
        member = self.members[via]
        return list(await asyncio.gather(*(member.submit(tx, timeout=10) for tx in txs)))

    async def settle(self, *member_ids: str, timeout: float = 10.0) -> int:
        """Wait until the given (default: running) members agree on one final height."""
        ids = member_ids or tuple(self.members)

        def agreed() -> bool:
            heights = {self.members[m].final_height for m in ids}
            tips = {self.members[m].status()["tip_height"] for m in ids}
            return len(heights) == 1 and tips == heights

        await wait_until(agreed, f"members {ids} to agree on a final height", timeout)
        return self.members[ids[0]].final_height

    # -- lifecycle -------------------------------------------------------------------

    def run(self, scenario: Callable[[Network], Awaitable[T]]) -> T:
        """Run ``scenario`` in a fresh event loop, then stop members and private chains."""

        async def main() -> T:
            try:
                return await scenario(self)
            finally:
                await self.aclose()

        return asyncio.run(main())

    async def aclose(self) -> None:
        # Members first: closing fails their pending submits, which the scenario's
        # own tasks then finish with (retrieved below, never left unretrieved).
        for member in self.members.values():
            await member.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, MedledgerError):
                await task
        for chain in (*self.chains.values(), *self._extra_chains):
            await chain.close()
        await self.orderer.close()
        for orderer in self._extra_orderers:
            await orderer.close()

    def close_stores(self) -> None:
        for store in self._all_stores:
            store.close()


#: The ``network`` fixture: ``network(n=4, params=FAST) -> Network``.
MakeNetwork = Callable[..., Network]


# -- rounds of anchors (tests of the round cut and of idle notices) --------------------


class FakeMonotonic:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def tips(net: Network) -> set[int]:
    return {m.status()["tip_height"] for m in net.members.values()}


async def anchor(net: Network, mid: str, round_no: int, *, time_ms: int | None = None) -> bytes:
    """Write to ``mid``'s private chain and publish its anchor; the anchor tx's hash.

    ``time_ms``: the anchor's signed time instead of now (an earlier slot's anchor).
    """
    await net.write_private(mid, 2, tag=f"round-{round_no}")
    tx = net.anchorers[mid].anchor_tx()
    assert tx is not None
    if time_ms is not None:
        tx = sign_tx(replace(tx, time_ms=time_ms), net.keys[mid])
    await publish_tx(net.orderer, tx)
    return tx.hash()


async def seen_by_all(net: Network, tx_hash: bytes) -> None:
    # ``seen`` is shared by every copy of the state: it holds what is in the order.
    await wait_until(
        lambda: all(tx_hash in m.state.seen for m in net.members.values()),
        "every member to take the transaction into its order",
    )


async def anchors_in_order(net: Network, members: tuple[str, ...], round_no: int) -> list[bytes]:
    """Anchor each of ``members`` and wait until every member has them in its order."""
    hashes = [await anchor(net, mid, round_no) for mid in members]
    for tx_hash in hashes:
        await seen_by_all(net, tx_hash)
    return hashes


def block_tx_hashes(net: Network, mid: str, height: int) -> list[bytes]:
    store = net.open_store(net.consortium_path(mid))
    return [sha256(d) for d in store.block(height).tx_data]
