"""NATS with TLS and per-member NKeys, on real nats-server processes.

Two servers routed over mutual TLS, each presenting a member's pinned
certificate; the operator creates the stream; members publish and read it,
and cannot do anything else to it. Anonymous and plaintext clients are
refused.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest

from medledger.core.errors import OrderingError
from medledger.ledger.clock import SystemClock
from medledger.ledger.ordering.jetstream import JetStreamOrderer
from medledger.localnet.natsserver import (
    NatsCluster,
    NatsSecurity,
    NatsUser,
    member_permissions,
    member_subscriptions,
    new_nkey,
)
from medledger.services.tls import client_context, load_certificate, pem_bundle, write_certificate

pytestmark = pytest.mark.timeout(180)
STREAM, SUBJECT = "CONSORTIUM", "consortium.order"


@dataclass
class SecuredCluster:
    cluster: NatsCluster
    tls: ssl.SSLContext  # trusts the members' certificates
    member_seed: Path
    operator_seed: Path

    @property
    def urls(self) -> list[str]:
        return self.cluster.client_urls()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredCluster]:
    base = tmp_path_factory.mktemp("nats-tls")
    certs = []
    for name in ("hosp-a", "hosp-b"):
        cert, key = base / f"{name}.crt", base / f"{name}.key"
        write_certificate(cert, key, name, ["127.0.0.1"], now_ms=SystemClock().now_ms())
        certs.append((cert, key))
    anchors = [load_certificate(cert) for cert, _ in certs]
    ca_file = base / "members.pem"
    ca_file.write_text(pem_bundle(anchors))
    seeds, users = {}, []
    for who in ("member", "operator"):
        seed, public = new_nkey()
        seeds[who] = base / f"{who}.nk"
        seeds[who].write_bytes(seed)
        if who == "member":
            users.append(
                NatsUser(
                    nkey=public,
                    publish=member_permissions(STREAM, SUBJECT),
                    subscribe=member_subscriptions(SUBJECT),
                )
            )
        else:
            users.append(NatsUser(nkey=public))
    security = [
        NatsSecurity(cert_file=cert, key_file=key, ca_file=ca_file, users=tuple(users))
        for cert, key in certs
    ]
    cluster = NatsCluster(base / "nats", size=2, security=security)
    cluster.start()
    try:
        yield SecuredCluster(cluster, client_context(anchors), seeds["member"], seeds["operator"])
    finally:
        cluster.stop()


async def _orderer(secured: SecuredCluster, seed: Path | None, **kw: object) -> JetStreamOrderer:
    return await JetStreamOrderer.connect(
        secured.urls,
        stream=STREAM,
        subject=SUBJECT,
        replicas=2,
        tls=secured.tls,
        nkeys_seed=seed,
        retry_for=10,
        **kw,  # type: ignore[arg-type]
    )


def test_a_member_orders_and_reads_but_cannot_purge_or_delete(secured: SecuredCluster) -> None:
    async def main() -> None:
        operator = await _orderer(secured, secured.operator_seed)  # creates the stream
        member = await _orderer(secured, secured.member_seed, create=False)
        try:
            seq = await member.publish("m-1", b"signed tx")
            reader = member.read(seq)
            first = await asyncio.wait_for(anext(reader), 30)
            await reader.aclose()
            assert (first.seq, first.payload) == (seq, b"signed tx")
            nc = await nats.connect(
                secured.urls, tls=secured.tls, nkeys_seed=str(secured.member_seed)
            )
            try:
                js = nc.jsm()
                attempts = {
                    "purge": lambda: js.purge_stream(STREAM),
                    "delete": lambda: js.delete_stream(STREAM),
                    "delete a message": lambda: js.delete_msg(STREAM, seq),
                    "create another": lambda: js.add_stream(name="OTHER", subjects=["other"]),
                }
                for what, attempt in attempts.items():
                    with pytest.raises((nats.errors.Error, TimeoutError)):
                        await asyncio.wait_for(attempt(), 2)
                    # The server refused it: nothing changed.
                    assert await operator.last_seq() == seq, what
            finally:
                await nc.close()
            # The message is still there for every reader.
            again = member.read(seq)
            assert (await asyncio.wait_for(anext(again), 30)).payload == b"signed tx"
            await again.aclose()
        finally:
            await member.close()
            await operator.close()

    asyncio.run(main())


def test_members_broadcast_and_hear_broadcasts_with_their_permissions(
    secured: SecuredCluster,
) -> None:
    async def main() -> None:
        operator = await _orderer(secured, secured.operator_seed)  # creates the stream
        sender = await _orderer(secured, secured.member_seed, create=False)
        listener = await _orderer(secured, secured.member_seed, create=False)
        heard: list[bytes] = []

        async def listen() -> None:
            async for payload in listener.broadcasts():
                heard.append(payload)

        task = asyncio.create_task(listen())
        try:
            deadline = asyncio.get_running_loop().time() + 20
            while not heard:  # sent again until the subscription reached the servers
                assert asyncio.get_running_loop().time() < deadline, "no broadcast heard"
                await sender.broadcast(b"vote")
                await asyncio.sleep(0.05)
            assert set(heard) == {b"vote"}
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            for orderer in (sender, listener, operator):
                await orderer.close()

    asyncio.run(main())


def test_anonymous_and_unknown_keys_are_refused(secured: SecuredCluster, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger.nk"
    stranger.write_bytes(new_nkey()[0])

    async def main() -> None:
        for seed in (None, stranger):
            with pytest.raises(nats.errors.Error) as refused:
                await nats.connect(
                    secured.urls[:1],
                    tls=secured.tls,
                    nkeys_seed=str(seed) if seed is not None else None,
                    allow_reconnect=False,
                    max_reconnect_attempts=0,
                    connect_timeout=5,
                )
            assert "authorization violation" in str(refused.value).lower()

    asyncio.run(main())


def _plaintext_session(port: int) -> tuple[bytes, bytes]:
    """What a server says first, and what it answers a plaintext CONNECT and PING with."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            first = raw.recv(4096)
            raw.sendall(b'CONNECT {"verbose":false}\r\nPUB consortium.order 1\r\nx\r\nPING\r\n')
            answer = raw.recv(4096)
        except (ConnectionError, TimeoutError):
            answer = b""
    return first, answer


def test_plaintext_is_refused_on_client_and_route_ports(secured: SecuredCluster) -> None:
    node = secured.cluster.nodes[0]
    info, answer = _plaintext_session(node.ports.client)
    assert info.startswith(b"INFO ") and b'"tls_required":true' in info
    assert b"PONG" not in answer  # no plaintext session: refused (or closed)
    _, answer = _plaintext_session(node.ports.cluster)
    assert b"PONG" not in answer


def test_a_client_that_does_not_trust_the_members_refuses_the_server(
    secured: SecuredCluster,
) -> None:
    async def main() -> None:
        with pytest.raises(OrderingError):
            await JetStreamOrderer.connect(
                secured.urls,
                stream=STREAM,
                subject=SUBJECT,
                tls=ssl.create_default_context(),  # the system's CAs: not the members
                nkeys_seed=secured.member_seed,
                retry_for=5,
            )

    asyncio.run(main())
