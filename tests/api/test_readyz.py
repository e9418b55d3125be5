"""``/readyz`` tells the truth about the node's background tasks.

A node whose consortium consume task has died has stopped following the
consortium: it must answer 503 and name the task and the reason, and answer
200 again once the task has been restarted and follows again. The node here is
a real one (keystore, SQLite stores, a one-member consortium on the solo
orderer); its ordering connection fails on demand, as a NATS stream that is
gone would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from medledger.api.app import create_app
from medledger.core.consortium import ConsortiumParams
from medledger.core.errors import OrderingError
from medledger.core.models import Transaction
from medledger.ledger.consortium.member import ConsortiumMember
from medledger.ledger.ordering.port import OrderedMessage, Orderer
from medledger.ledger.ordering.solo import SoloOrderer
from medledger.node import Node, init_node, open_node, write_genesis
from medledger.storage.keystore import KdfParams
from medledger.storage.sqlite.tokens import SqliteTokenStore

PASSPHRASE = b"readyz test passphrase"


class FailingReads:
    """The order, except that reading fails while ``broken`` (the stream is gone)."""

    def __init__(self, inner: Orderer) -> None:
        self.inner = inner
        self.broken = False

    async def publish(self, msg_id: str, payload: bytes) -> int:
        return await self.inner.publish(msg_id, payload)

    async def read(self, start: int = 1) -> AsyncIterator[OrderedMessage]:
        async for msg in self.inner.read(start):
            if self.broken:
                raise OrderingError("stream CONSORTIUM: not found")
            yield msg

    async def broadcast(self, payload: bytes) -> None:
        await self.inner.broadcast(payload)

    def broadcasts(self) -> AsyncIterator[bytes]:
        return self.inner.broadcasts()

    async def last_seq(self) -> int:
        return await self.inner.last_seq()

    async def close(self) -> None:
        await self.inner.close()


async def _one_member_node(root: Path) -> Node:
    init_node(root, name="Readyz Hospital", passphrase=PASSPHRASE, kdf=KdfParams(n=2**12))
    write_genesis(
        "readyz", [root], time_ms=1_700_000_000_000, params=ConsortiumParams(cut_after_ms=5)
    )
    return open_node(root, PASSPHRASE)


async def _readyz_until(
    client: httpx.AsyncClient, status: int, what: str, timeout: float = 15.0
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        response = await client.get("/readyz")
        if response.status_code == status:
            body: dict[str, Any] = response.json()
            return body
        assert asyncio.get_running_loop().time() < deadline, f"{what}: {response.text}"
        await asyncio.sleep(0.02)


def test_a_dead_consume_task_makes_the_node_unready_until_it_follows_again(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        node = await _one_member_node(tmp_path / "node")
        tokens = SqliteTokenStore(tmp_path / "tokens.db")
        orderer = FailingReads(SoloOrderer())
        try:
            member = await node.join_consortium(orderer, anchor=False)
            app = create_app(node, tokens)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
                await _readyz_until(client, 200, "a fresh node is ready")
                orderer.broken = True
                pending = asyncio.ensure_future(member.submit(member.sign(_probe(member))))
                body = await _readyz_until(client, 503, "the dead consume task shows")
                assert body["status"] == "unhealthy"
                reason = body["problems"]["consortium-consume"]
                assert "OrderingError" in reason and "restarting" in reason
                assert "CONSORTIUM" not in reason  # details go to the log, not to callers
                orderer.broken = False
                await _readyz_until(client, 200, "the restarted consume task follows again")
                receipt = await asyncio.wait_for(pending, 15)
                assert member.final_height >= receipt.height >= 1
        finally:
            await node.close()
            await orderer.close()
            tokens.close()

    asyncio.run(main())


def test_an_ended_consume_task_makes_the_node_unready(tmp_path: Path) -> None:
    async def main() -> None:
        node = await _one_member_node(tmp_path / "node")
        tokens = SqliteTokenStore(tmp_path / "tokens.db")
        orderer = SoloOrderer()
        try:
            await node.join_consortium(orderer, anchor=False)
            transport = httpx.ASGITransport(app=create_app(node, tokens))
            async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
                await _readyz_until(client, 200, "a fresh node is ready")
                up = 'medledger_task_up{task="consortium-consume"}'
                assert f"{up} 1" in (await client.get("/metrics")).text.splitlines()
                await orderer.close()  # the connection under the member is gone
                body = await _readyz_until(client, 503, "the ended consume task shows")
                assert body["problems"]["consortium-consume"].startswith("ended")
                assert "consortium-cut-timer" not in body["problems"]
                assert f"{up} 0" in (await client.get("/metrics")).text.splitlines()
        finally:
            await node.close()
            tokens.close()

    asyncio.run(main())


def _probe(member: ConsortiumMember) -> Transaction:
    """A one-entry ``access.batch`` (pseudonyms only), the simplest tx a member submits."""
    entry = {
        "reader": member.member_id,
        "patient": "00" * 32,
        "consent": "",
        "resource": "Observation/probe",
        "outcome": "allowed",
    }
    return Transaction(
        type="access.batch",
        chain=member.chain_id,
        body={"holder": member.member_id, "entries": [entry]},
        time_ms=1_700_000_000_001,
    )
