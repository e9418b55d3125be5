"""A running node's HTTPS trust follows the consortium and its certificate files, without restart.

An in-process consortium of three nodes served over loopback HTTPS
(tests/sharing_support.py, solo ordering): membership changes are real
quorum-signed transactions, and every check is a real TLS handshake.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from medledger.cli import cli as medledger_cli
from medledger.core.models import Transaction
from medledger.core.tls import certificate_fingerprint
from medledger.node import Node
from medledger.services.tls import client_context, load_certificate, server_context
from sharing_support import PASSPHRASE, SharingNet, now_ms, sharing_network

pytestmark = pytest.mark.timeout(240)


def as_member(sn: SharingNet, member: str, holder: str = "alpha") -> ssl.SSLContext:
    """Trusting ``holder``'s certificate, presenting ``member``'s (what ``member``'s node does)."""
    return sn.node(member).client_tls_context(load_certificate(sn.node(holder).paths.tls_cert))


async def readyz(sn: SharingNet, tls: ssl.SSLContext) -> int:
    """The status of GET /readyz on a new connection (a new handshake)."""
    async with httpx.AsyncClient(base_url=sn.urls["alpha"], verify=tls, timeout=30) as client:
        return (await client.get("/readyz")).status_code


async def membership_change(sn: SharingNet, tx_type: str, body: dict[str, object]) -> None:
    """``tx_type`` signed by alpha and beta (a quorum of three), final everywhere."""
    tx = Transaction(type=tx_type, chain=sn.chain_id, body=body, time_ms=now_ms())
    signatures = tuple(
        sn.node(m).keystore.signing_key().sign(tx.signing_bytes()) for m in ("alpha", "beta")
    )
    member = sn.node("alpha").consortium
    assert member is not None
    await member.submit(replace(tx, signatures=signatures))
    await sn.settle()


def cli(*args: str) -> str:
    """Run a medledger command in this process (a thread: it may run its own event loop)."""
    result = CliRunner().invoke(
        medledger_cli,
        list(args),
        env={"MEDLEDGER_PASSPHRASE": PASSPHRASE.decode(), "MEDLEDGER_ORDERING": "solo"},
        catch_exceptions=True,
    )
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def served_certificate(response: httpx.Response) -> str:
    """The fingerprint of the certificate the server presented on ``response``'s connection."""
    ssl_object = response.extensions["network_stream"].get_extra_info("ssl_object")
    return certificate_fingerprint(ssl_object.getpeercert(binary_form=True))


async def tls_handshake_succeeds(server_node: Node, client: ssl.SSLContext) -> bool:
    """Whether ``client`` accepts a TLS server presenting ``server_node``'s certificate now."""
    paths = server_node.paths
    server = await asyncio.start_server(
        lambda _r, w: w.close(), "127.0.0.1", 0, ssl=server_context(paths.tls_cert, paths.tls_key)
    )
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname="127.0.0.1"
        )
    except ssl.SSLError:
        return False
    finally:
        server.close()
    writer.close()
    return True


def test_renewal_and_removal_take_effect_in_the_running_server(tmp_path: Path) -> None:
    """Renewal: a client making requests throughout (new handshakes and one kept-alive
    connection) sees no failure, and new handshakes get the new certificate once its
    ``member.tls`` is final. Removal: the removed member's certificate is then refused
    in the handshake by the same running server."""

    async def story(sn: SharingNet) -> None:
        alpha = sn.node("alpha")
        assert alpha.server_tls is not None
        old = load_certificate(alpha.paths.tls_cert)
        roots = {m: str(sn.node(m).paths.root) for m in sn.names}
        trusted = [old]  # what an API client of alpha trusts: its pinned certificate(s)
        seen: list[str] = []
        seen_kept: list[str] = []
        failures: list[object] = []
        stop = asyncio.Event()

        async def keep_asking() -> None:
            async with httpx.AsyncClient(
                base_url=sn.urls["alpha"], verify=client_context([old]), timeout=30
            ) as kept_alive:
                while not stop.is_set():
                    try:
                        # A new connection (a new handshake) trusting the pinned certificates ...
                        async with httpx.AsyncClient(
                            base_url=sn.urls["alpha"], verify=client_context(trusted), timeout=30
                        ) as fresh:
                            response = await fresh.get("/readyz")
                            seen.append(served_certificate(response))
                    except httpx.HTTPError as exc:
                        failures.append(exc)
                    try:
                        # ... and a connection opened before the renewal, kept alive.
                        kept = await kept_alive.get("/readyz")
                        seen_kept.append(served_certificate(kept))
                    except httpx.HTTPError as exc:
                        failures.append(("kept", exc))
                    await asyncio.sleep(0.02)

        # beta's NATS client context (what its JetStream connection trusts the servers with).
        beta_nats = sn.node("beta").nats_tls_context()
        asker = asyncio.create_task(keep_asking())
        try:
            output = await asyncio.to_thread(
                cli, "node", "tls-cert", "--dir", roots["alpha"], "--renew"
            )
            assert "tls.next.crt" in output
            new = load_certificate(alpha.paths.tls_next_cert)
            trusted.append(new)
            tx_file = str(tmp_path / "member-tls.json")
            await asyncio.to_thread(
                cli, "consortium", "propose-tls", "--dir", roots["alpha"], "--out", tx_file
            )
            # Proposed, not final: the node still presents the certificate the members pin.
            assert load_certificate(alpha.paths.tls_cert) == old
            refused = CliRunner().invoke(
                medledger_cli,
                ["consortium", "submit", "--dir", roots["gamma"], "--tx", tx_file],
                env={"MEDLEDGER_ORDERING": "solo"},
            )
            assert refused.exit_code != 0 and "needs 2 member signatures" in str(refused.exception)
            await asyncio.to_thread(
                cli, "consortium", "sign", "--dir", roots["beta"], "--tx", tx_file
            )
            await asyncio.to_thread(
                cli, "consortium", "submit", "--dir", roots["gamma"], "--tx", tx_file
            )
            deadline = asyncio.get_running_loop().time() + 30
            while not seen or seen[-1] != new.fingerprint:
                assert asyncio.get_running_loop().time() < deadline, (
                    "the new certificate was not served"
                )
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # a few more requests on both connections after the switch
        finally:
            stop.set()
            await asker
        assert failures == []
        # The connection opened before the renewal went on, with the certificate it began with.
        assert seen_kept and set(seen_kept) == {old.fingerprint}
        assert seen[0] == old.fingerprint and seen[-1] == new.fingerprint
        assert load_certificate(alpha.paths.tls_cert) == new
        assert not alpha.paths.tls_next_cert.exists() and not alpha.paths.tls_next_key.exists()
        # A NATS server presenting alpha's renewed certificate is trusted on reconnection.
        assert await tls_handshake_succeeds(alpha, beta_nats)
        # Sharing goes on over mutual TLS both ways with the renewed certificate.
        consent = await sn.grant("beta")
        beta = sn.node("beta").sharing
        assert beta is not None
        shared = await beta.fetch("alpha", consent, sn.records[1])
        assert f"{shared.resource['resourceType']}/{shared.resource['id']}" == sn.records[1]

        # Removal: gamma connects while a member, is refused in the handshake once removed.
        gamma = as_member(sn, "gamma")
        assert await readyz(sn, gamma) in (200, 503)
        reloads = alpha.server_tls.reloads
        await membership_change(sn, "member.remove", {"id": "gamma"})
        with pytest.raises(httpx.TransportError):
            await readyz(sn, gamma)
        assert alpha.server_tls.reloads == reloads + 1
        assert await readyz(sn, as_member(sn, "beta")) in (200, 503)

    async def main() -> None:
        async with sharing_network(tmp_path, ["Alpha", "Beta", "Gamma"]) as sn:
            await story(sn)

    asyncio.run(main())
