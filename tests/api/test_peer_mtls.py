"""``/peer/v1`` over mutual TLS: the client certificate must be the signer's pinned one.

An in-process consortium of three nodes served over loopback HTTPS
(tests/sharing_support.py). Requests are signed with real member keys and
sent with real certificates: a member's own, another member's, none, and a
certificate no member has.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from medledger.core.encoding import canonical_bytes
from medledger.core.peer import PeerRequest
from medledger.ledger.clock import SystemClock
from medledger.services.tls import client_context, load_certificate, write_certificate
from sharing_support import SharingNet, now_ms, sharing_network

pytestmark = pytest.mark.timeout(240)


def run(base: Path, story: Callable[[SharingNet], Awaitable[None]]) -> None:
    async def main() -> None:
        async with sharing_network(base, ["Alpha", "Beta", "Gamma"]) as sn:
            await story(sn)

    asyncio.run(main())


def signed_by(sn: SharingNet, reader: str, consent: str) -> bytes:
    request = PeerRequest(
        op="fetch",
        reader=reader,
        holder="alpha",
        consent=consent,
        resource=sn.records[1],
        nonce=secrets.token_hex(16),
        time_ms=now_ms(),
    )
    key = sn.node(reader).keystore.signing_key()
    return canonical_bytes(request.sign(key).to_json())


def as_member(sn: SharingNet, member: str) -> ssl.SSLContext:
    """Trusting alpha's certificate, presenting ``member``'s (what ``member``'s node does)."""
    alpha = load_certificate(sn.node("alpha").paths.tls_cert)
    return sn.node(member).client_tls_context(alpha)


async def post(sn: SharingNet, tls: ssl.SSLContext, body: bytes) -> httpx.Response:
    async with httpx.AsyncClient(base_url=sn.urls["alpha"], verify=tls, timeout=30) as c:
        return await c.post("/peer/v1/fetch", content=body)


def holder_state(sn: SharingNet) -> tuple[int, int]:
    alpha = sn.node("alpha")
    return alpha.chain.head.height, alpha.chain.head.log_size


def test_a_members_request_on_another_members_connection_is_refused_and_writes_nothing(
    tmp_path: Path,
) -> None:
    async def story(sn: SharingNet) -> None:
        consent = await sn.grant("beta")
        before = holder_state(sn)
        relayed = await post(sn, as_member(sn, "gamma"), signed_by(sn, "beta", consent))
        assert relayed.status_code == 403, relayed.text
        assert "does not belong to the member that signed" in relayed.text
        bare = await post(
            sn,
            client_context([load_certificate(sn.node("alpha").paths.tls_cert)]),
            signed_by(sn, "beta", consent),
        )
        assert bare.status_code == 403, bare.text
        assert "must come over mutual TLS" in bare.text
        # Refused in authentication, before the access log or the nonce store is touched.
        assert holder_state(sn) == before, "a request refused at authentication wrote a block"
        # The same request on beta's own connection is served.
        own = await post(sn, as_member(sn, "beta"), signed_by(sn, "beta", consent))
        assert own.status_code == 200, own.text
        assert own.json()["resource"] == sn.records[1]

    run(tmp_path, story)


def test_a_certificate_no_member_has_is_refused_in_the_handshake(tmp_path: Path) -> None:
    async def story(sn: SharingNet) -> None:
        cert, key = tmp_path / "outsider.crt", tmp_path / "outsider.key"
        write_certificate(cert, key, "outsider", ["127.0.0.1"], now_ms=SystemClock().now_ms())
        alpha = load_certificate(sn.node("alpha").paths.tls_cert)
        outsider = client_context([alpha], cert_path=cert, key_path=key)
        consent = await sn.grant("beta")
        before = holder_state(sn)
        with pytest.raises(httpx.TransportError):
            # Signed by a real member: the handshake refuses before any byte is read.
            await post(sn, outsider, signed_by(sn, "beta", consent))
        assert holder_state(sn) == before

    run(tmp_path, story)


def test_a_client_trusting_another_certificate_does_not_talk_to_the_node(
    tmp_path: Path,
) -> None:
    async def story(sn: SharingNet) -> None:
        beta_cert = load_certificate(sn.node("beta").paths.tls_cert)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await post(sn, client_context([beta_cert]), b"{}")

    run(tmp_path, story)
