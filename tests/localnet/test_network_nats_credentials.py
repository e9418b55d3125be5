"""``network up --ordering jetstream``: NATS over TLS, one NKey per member, an operator's.

The network's own nats-server, as ``network up`` configured it: the members'
nodes order over it (the network becomes ready); a member's credential cannot
purge or delete the stream; an anonymous or plaintext client is refused.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest

from medledger.services.tls import client_context, load_certificate
from network_support import run_cli, stop_network

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    base = tmp_path_factory.mktemp("nats-credentials") / "net"
    try:
        up = run_cli(
            "network", "up", "--dir", base, "--institutions", "1", "--ordering", "jetstream"
        )
        assert up.code == 0, up
        assert "eof_received" not in up.out + up.err
        yield base, run_cli("network", "up", "--dir", base, "--json").json()
    finally:
        stop_network(base)


def _connect(base: Path, port: int, seed: Path | None) -> Any:
    tls = client_context([load_certificate(base / "hospital-1" / "tls.crt")])
    return nats.connect(
        [f"tls://127.0.0.1:{port}"],
        tls=tls,
        nkeys_seed=str(seed) if seed is not None else None,
        allow_reconnect=False,
        max_reconnect_attempts=0,
        connect_timeout=5,
    )


def test_a_members_credential_cannot_purge_or_delete_the_stream(
    network: tuple[Path, dict[str, Any]],
) -> None:
    base, data = network
    port = data["nats"][0]["client"]

    async def main() -> None:
        nc = await _connect(base, port, base / "hospital-1" / "nats.nk")
        try:
            js = nc.jsm()
            before = (await js.stream_info("CONSORTIUM")).state.messages
            assert before > 0  # the node ordered its genesis votes over it
            for attempt in (
                lambda: js.purge_stream("CONSORTIUM"),
                lambda: js.delete_stream("CONSORTIUM"),
                lambda: js.update_stream(name="CONSORTIUM", subjects=["consortium.order"]),
            ):
                with pytest.raises((nats.errors.Error, TimeoutError)):
                    await asyncio.wait_for(attempt(), 2)
            assert (await js.stream_info("CONSORTIUM")).state.messages >= before
        finally:
            await nc.close()

    asyncio.run(main())


def test_anonymous_and_plaintext_clients_are_refused(network: tuple[Path, dict[str, Any]]) -> None:
    base, data = network
    port = data["nats"][0]["client"]

    async def anonymous() -> None:
        with pytest.raises(nats.errors.Error, match=r"(?i)authorization violation"):
            await _connect(base, port, None)

    asyncio.run(anonymous())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        assert b'"tls_required":true' in raw.recv(4096)
        raw.sendall(b'CONNECT {"verbose":false}\r\nPING\r\n')
        try:
            answer = raw.recv(4096)
        except (ConnectionError, TimeoutError):
            answer = b""
        assert b"PONG" not in answer
