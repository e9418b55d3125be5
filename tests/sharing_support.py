"""An in-process consortium whose nodes serve ``/peer/v1`` over real loopback HTTPS.

Every node of a :class:`~medledger.localnet.network.LocalNetwork` is served by its own
uvicorn server on a free port of 127.0.0.1 (all in the test's event loop), so
sharing requests travel through aiohttp, mutual TLS, HTTP and FastAPI exactly
as between machines. A patient with a wallet is enrolled at the first institution.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from medledger.core.consortium import ConsortiumParams
from medledger.localnet.loopback import loopback_socket, serve_nodes, url_of
from medledger.localnet.network import LocalNetwork
from medledger.node import Node
from medledger.services.patients import PatientWallet
from medledger.services.tls import client_context, load_certificate
from medledger.storage.keystore import KdfParams
from medledger.storage.ports import TokenStore
from medledger.synthetic import generate_patients

PASSPHRASE = b"sharing test passphrase"
FAST_KDF = KdfParams(n=2**12)
WALLET_PASSPHRASE = b"patient passphrase"
HOUR_MS = 3_600_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class SharingNet:
    net: LocalNetwork
    wallet: PatientWallet
    patient_id: str
    records: list[str]  # "Type/id" held at the first institution about the patient
    names: list[str]
    urls: dict[str, str]
    tokens: dict[str, TokenStore]

    def token(self, inst: str, role: str, patient: str | None = None) -> str:
        """A fresh API bearer token for ``inst``'s node."""
        text, _ = self.tokens[inst].create(role=role, patient=patient, now_ms=now_ms())
        return text

    def node(self, inst: str) -> Node:
        return self.net.nodes[inst]

    def tls(self, inst: str) -> ssl.SSLContext:
        """What an API client of ``inst``'s node trusts: that node's pinned certificate alone."""
        return client_context([load_certificate(self.node(inst).paths.tls_cert)])

    @property
    def chain_id(self) -> str:
        member = self.node(self.names[0]).consortium
        assert member is not None
        return member.chain_id

    async def grant(
        self,
        grantee: str,
        scope: list[str] | None = None,
        *,
        expires_ms: int | None = None,
        purpose: str = "TREAT",
        wallet: PatientWallet | None = None,
        via: str | None = None,
        starts_ms: int | None = None,
    ) -> str:
        """A consent, final on the consortium; returns its tx hash (hex)."""
        tx = (wallet or self.wallet).grant(
            chain=self.chain_id,
            grantee=grantee,
            scope=scope or ["*"],
            purpose=purpose,
            expires_ms=expires_ms or now_ms() + HOUR_MS,
            time_ms=now_ms(),
            starts_ms=starts_ms,
        )
        member = self.node(via or self.names[0]).consortium
        assert member is not None
        await member.submit(tx)
        await self.settle()
        return tx.hash().hex()

    async def revoke(self, consent: str) -> None:
        tx = self.wallet.revoke(chain=self.chain_id, grant=bytes.fromhex(consent), time_ms=now_ms())
        member = self.node(self.names[0]).consortium
        assert member is not None
        await member.submit(tx)
        await self.settle()

    async def settle(self, timeout: float = 10.0) -> None:
        """Every member has finalized the same height."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            heights = {n.consortium.final_height for n in self.net.nodes.values() if n.consortium}
            if len(heights) == 1:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("members did not agree on a final height")


@contextlib.asynccontextmanager
async def sharing_network(
    base: Path, names: list[str], *, ordering: str = "solo", hpke_kem: str = "MLKEM768_X25519"
) -> AsyncIterator[SharingNet]:
    socks = {name.lower(): loopback_socket() for name in names}
    urls = {inst: url_of(sock) for inst, sock in socks.items()}
    net = await LocalNetwork.create(
        base,
        names,
        passphrase=PASSPHRASE,
        ordering=ordering,
        kdf=FAST_KDF,
        params=ConsortiumParams(cut_after_ms=5, anchor_interval_ms=50),
        peer_urls=urls,
        hpke_kem=hpke_kem,
    )
    try:
        async with serve_nodes(net.nodes, socks, base) as tokens:
            holder = net.nodes[names[0].lower()]
            patient = generate_patients(1, seed=7, resources_per_patient=8)[0]
            stored = []
            for resource in patient.all_resources():
                written, _ = await holder.records.update(
                    resource["resourceType"], resource["id"], resource
                )
                stored.append(written)
            patient_id = patient.patient_id
            wallet = PatientWallet.create(base / "patient.wallet", WALLET_PASSPHRASE)
            assert holder.sharing is not None
            await holder.enrollments.enroll(
                patient_id,
                wallet.public,
                wallet.enrollment_signature(
                    holder.config.institution, holder.records.patient_pseudonym(patient_id)
                ),
            )
            await net.wait_anchored()
            yield SharingNet(
                net=net,
                wallet=wallet,
                patient_id=patient_id,
                records=[f"{s.resource_type}/{s.id}" for s in stored],
                names=[n.lower() for n in names],
                urls=urls,
                tokens=tokens,
            )
    finally:
        await net.close()
