"""An API worker's TLS anchors follow the consortium's members without a restart.

The parent (``open_node``) runs the consortium member and stores the final
chain; a worker (``open_worker_node`` on the same directory) trusts, at each
handshake, the members after the newest stored block (decision 0035).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from medledger.core.consortium import ConsortiumParams, Member
from medledger.core.keys import SigningKey
from medledger.core.models import Transaction
from medledger.ledger.ordering.solo import SoloOrderer
from medledger.node import init_node, open_node, open_worker_node, write_genesis
from medledger.services.tls import create_certificate
from medledger.storage.keystore import KdfParams

PASSPHRASE = b"worker tls members passphrase"


def test_a_member_added_by_the_consortium_is_trusted_by_a_running_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A node in a one-member consortium (MEDLEDGER_ORDERING configures it, as node start's).
    monkeypatch.setenv("MEDLEDGER_ORDERING", "solo")
    root = tmp_path / "node"
    init_node(root, name="Worker TLS Hospital", passphrase=PASSPHRASE, kdf=KdfParams(n=2**12))
    write_genesis("wt", [root], time_ms=1_700_000_000_000, params=ConsortiumParams(cut_after_ms=5))
    _, new_cert = create_certificate("h-new", ["127.0.0.1"], now_ms=int(time.time() * 1000))

    async def main() -> tuple[set[bytes], set[bytes], set[bytes]]:
        parent = open_node(root, PASSPHRASE)
        orderer = SoloOrderer()
        worker = open_worker_node(root, PASSPHRASE)
        try:
            member = await parent.join_consortium(orderer, anchor=False)
            before = {c.der for c in worker.tls_anchors()}
            new = Member(
                id="h-new",
                name="New Hospital",
                signing_key=SigningKey.generate().public,
                tls_cert=new_cert,
            )
            unsigned = Transaction(
                type="member.add",
                chain=member.chain_id,
                body={"member": new.to_json()},
                time_ms=int(time.time() * 1000),
            )
            receipt = await member.submit(member.sign(unsigned), timeout=10)
            deadline = time.monotonic() + 15
            while member.final_height < receipt.height and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            after = {c.der for c in worker.tls_anchors()}
            parents = {c.der for c in parent.tls_anchors()}
        finally:
            await worker.close_stores()
            await parent.close()
            await orderer.close()
        return before, after, parents

    before, after, parents = asyncio.run(main())
    assert new_cert.der not in before
    assert new_cert.der in after  # no restart of the worker
    assert after == parents
