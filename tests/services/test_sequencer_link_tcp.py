"""The sequencer link between an institution's hosts: TCP with mutual TLS pinned to the
institution's own certificate (``SequencerServer.start_tcp``, ``tcp_dialer``), real sockets.

A standby (``open_worker_node`` with the TCP dialer) writes through the active node's
link; a peer with another certificate, or none, is never served and appends nothing;
a dialer that reaches a server with another certificate refuses to use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import ssl
import threading
import warnings
from pathlib import Path

import pytest

from medledger.config import NodePaths
from medledger.core.errors import SequencerUnavailable
from medledger.core.transactions import ACCESS
from medledger.localnet.natsserver import free_ports
from medledger.node import Node, init_node, open_node, open_worker_node
from medledger.services.access import AccessEntry
from medledger.services.sequencer_link import (
    SOCKET_NAME,
    SequencerServer,
    read_frame,
    tcp_dialer,
    write_frame,
)
from medledger.services.tls import client_context, link_contexts, load_certificate
from medledger.storage.keystore import KdfParams

PASSPHRASE = b"sequencer link tcp test passphrase"
#: Bounds every wait of a test on its own server thread.
_DEADLINE_S = 30.0


def _node(root: Path, name: str) -> Path:
    init_node(root, name=name, passphrase=PASSPHRASE, kdf=KdfParams(n=2**12))
    return root


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("link-tcp")
    return _node(base / "own", "Link Tcp Hospital"), _node(base / "other", "Other Hospital")


def _entry(institution: str) -> dict[str, str]:
    return AccessEntry(
        reader=institution,
        holder=institution,
        patient="",
        consent="",
        resource="Patient:" + "cd" * 32,
        outcome="allowed",
    ).private_body()


async def _active(root: Path) -> tuple[Node, SequencerServer, str]:
    node = open_node(root, PASSPHRASE)
    paths = NodePaths(root=root)
    server_tls, _ = link_contexts(paths.tls_cert, paths.tls_key)
    link = SequencerServer(root / SOCKET_NAME, chain=node.writer_chain, records=node.records)
    host, port = await link.start_tcp(
        "127.0.0.1", 0, server_tls, load_certificate(paths.tls_cert).der
    )
    return node, link, f"{host}:{port}"


def test_a_standby_writes_through_the_active_hosts_link(roots: tuple[Path, Path]) -> None:
    own, _ = roots

    async def main() -> None:
        node, link, address = await _active(own)
        paths = NodePaths(root=own)
        _, client_tls = link_contexts(paths.tls_cert, paths.tls_key)
        dial = tcp_dialer(lambda: address, client_tls, load_certificate(paths.tls_cert).der)
        standby = open_worker_node(own, PASSPHRASE, dial=dial)
        try:
            height = node.chain.head.height
            stored = await standby.records.create(
                {"resourceType": "Patient", "name": [{"family": "Tcp"}]}
            )
            assert node.chain.head.height == height + 1
            assert (await node.records.read("Patient", stored.id)).data == stored.data
            receipt = await standby.chain.submit(ACCESS, _entry(node.config.institution))
            assert node.store.tx_location(receipt.tx_hash)[0] == receipt.height
            assert link.refused == 0
        finally:
            await standby.stop()
            await standby.close_stores()
            await link.close()
            await node.close()

    asyncio.run(main())


async def _submit_as(
    address: str, tls: ssl.SSLContext, institution: str, chain: str
) -> dict[str, object] | None:
    """Send one submit frame with ``tls``; the answer, or None if none came back."""
    host, port = address.rsplit(":", 1)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, int(port), ssl=tls), 10
        )
    except (ssl.SSLError, OSError):
        return None
    try:
        tx = {
            "type": ACCESS,
            "chain": chain,
            "body": _entry(institution),
            "time_ms": 1,
        }
        write_frame(writer, {"op": "submit", "txs": [tx], "id": 1})
        await writer.drain()
        answer = await asyncio.wait_for(read_frame(reader), 10)
    except (ssl.SSLError, OSError, asyncio.IncompleteReadError):
        return None
    finally:
        writer.close()
    return answer


def test_a_peer_without_the_institutions_certificate_is_never_served(
    roots: tuple[Path, Path],
) -> None:
    own, other = roots

    async def main() -> None:
        node, link, address = await _active(own)
        own_cert = load_certificate(NodePaths(root=own).tls_cert)
        other_paths = NodePaths(root=other)
        try:
            height = node.chain.head.height
            institution, chain = node.config.institution, node.config.chain
            # Trusts the server, presents another institution's certificate.
            stranger = client_context(
                [own_cert], cert_path=other_paths.tls_cert, key_path=other_paths.tls_key
            )
            stranger.check_hostname = False
            assert await _submit_as(address, stranger, institution, chain) is None
            # Trusts the server, presents no certificate at all.
            anonymous = client_context([own_cert])
            anonymous.check_hostname = False
            assert await _submit_as(address, anonymous, institution, chain) is None
            assert node.chain.head.height == height, "an unauthenticated peer appended"
            # The institution's own certificate is served (the same frame is accepted).
            _, own_tls = link_contexts(NodePaths(root=own).tls_cert, NodePaths(root=own).tls_key)
            answer = await _submit_as(address, own_tls, institution, chain)
            assert answer is not None and answer.get("ok") is True, answer
            assert node.chain.head.height == height + 1
        finally:
            await link.close()
            await node.close()

    asyncio.run(main())


def test_a_dialer_refuses_a_server_with_another_certificate(roots: tuple[Path, Path]) -> None:
    own, other = roots

    async def main() -> None:
        node, link, address = await _active(other)
        try:
            paths = NodePaths(root=own)
            _, own_tls = link_contexts(paths.tls_cert, paths.tls_key)
            dial = tcp_dialer(lambda: address, own_tls, load_certificate(paths.tls_cert).der)
            with pytest.raises((SequencerUnavailable, ssl.SSLError, OSError)):
                await dial()
            nowhere = tcp_dialer(lambda: None, own_tls, load_certificate(paths.tls_cert).der)
            with pytest.raises(SequencerUnavailable):
                await nowhere()
        finally:
            await link.close()
            await node.close()

    asyncio.run(main())


def test_a_refused_dial_closes_its_connection_before_it_raises(roots: tuple[Path, Path]) -> None:
    """A server whose certificate is trusted by the context but is not the pinned one: the
    dial is refused, and its socket is closed by then although that server never answers
    a TLS shutdown (an unawaited close left it open for the garbage collector to find)."""
    own, other = roots
    other_paths = NodePaths(root=other)
    server_tls, client_tls = link_contexts(other_paths.tls_cert, other_paths.tls_key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(_DEADLINE_S)
    finished = threading.Event()

    def serve() -> None:  # completes the handshake, then says nothing more
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with server_tls.wrap_socket(conn, server_side=True):
                finished.wait(_DEADLINE_S)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    port = listener.getsockname()[1]
    pinned = load_certificate(NodePaths(root=own).tls_cert).der
    dial = tcp_dialer(lambda: f"127.0.0.1:{port}", client_tls, pinned)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            with pytest.raises(SequencerUnavailable, match="not this institution"):
                asyncio.run(dial())
            gc.collect()  # an unclosed socket or transport says so when it is collected
    finally:
        finished.set()
        server.join(_DEADLINE_S)
        listener.close()
    assert not [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def test_a_standby_whose_link_is_down_says_so_before_the_next_write(
    roots: tuple[Path, Path],
) -> None:
    """A standby probes its link (``SequencerClient.probe``) each poll: ``/readyz`` names the
    ``private-sequencer`` problem without waiting for a write to fail, and a write fails
    with 503 (``SequencerUnavailable``) rather than waiting."""
    own, _ = roots
    (port,) = free_ports(1)  # nothing listens there: the active host is gone

    async def main() -> None:
        paths = NodePaths(root=own)
        _, client_tls = link_contexts(paths.tls_cert, paths.tls_key)
        dial = tcp_dialer(
            lambda: f"127.0.0.1:{port}", client_tls, load_certificate(paths.tls_cert).der
        )
        standby = open_worker_node(own, PASSPHRASE, dial=dial)
        try:
            assert "private-sequencer" not in standby.health.problems()
            await standby.chain.probe()
            problems = standby.health.problems()
            assert problems.get("private-sequencer") == "the node's sequencer cannot be reached"
            with pytest.raises(SequencerUnavailable):
                await standby.records.create({"resourceType": "Patient", "gender": "other"})
        finally:
            await standby.stop()
            await standby.close_stores()

    asyncio.run(main())
