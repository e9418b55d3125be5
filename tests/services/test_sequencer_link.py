"""The worker ↔ sequencer link (``services.sequencer_link``), in one process, real sockets.

The sequencer side is a node opened by ``open_node`` serving ``SequencerServer``;
the worker side is ``open_worker_node`` on the same directory, as an API worker
process opens it. Both run on one event loop here, which changes nothing about
what crosses the socket.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from medledger.core.errors import (
    InvalidInput,
    PreconditionFailed,
    SequencerUnavailable,
    StaleKeys,
)
from medledger.core.models import Transaction
from medledger.core.transactions import ACCESS, RECORD_PUT
from medledger.node import Node, init_node, open_node, open_worker_node
from medledger.services.access import AccessEntry
from medledger.services.sequencer_link import (
    MAX_FRAME_BYTES,
    SOCKET_NAME,
    SequencerServer,
    read_frame,
    write_frame,
)
from medledger.storage.keystore import KdfParams

PASSPHRASE = b"sequencer link test passphrase"
DEADLINE_S = 20.0


def _patient(family: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": family}]}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "node"
    init_node(root, name="Link Hospital", passphrase=PASSPHRASE, kdf=KdfParams(n=2**12))
    return root


class Pair:
    """A sequencer node with its link server, and a worker node on the same directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stale_keys = 0
        self.sequencer: Node = open_node(root, PASSPHRASE)
        self.server = SequencerServer(
            root / SOCKET_NAME,
            chain=self.sequencer.writer_chain,
            records=self.sequencer.records,
        )
        self.worker: Node = open_worker_node(root, PASSPHRASE, on_stale_keys=self._stale)

    def _stale(self) -> None:
        self.stale_keys += 1

    async def close(self) -> None:
        await self.worker.stop()
        await self.worker.close_stores()
        await self.server.close()
        await self.sequencer.close()


def run(root: Path, body: Callable[[Pair], Awaitable[None]]) -> None:
    async def main() -> None:
        pair = Pair(root)
        await pair.server.start()
        try:
            await body(pair)
        finally:
            await pair.close()

    asyncio.run(main())


def test_a_worker_write_is_committed_by_the_sequencer_and_read_back(root: Path) -> None:
    async def body(pair: Pair) -> None:
        height = pair.sequencer.chain.head.height
        stored = await pair.worker.records.create(_patient("Link"))
        # The sequencer wrote the block, the index row and stamped the chain base.
        assert pair.sequencer.chain.head.height == height + 1
        row = pair.sequencer.index.latest("Patient", stored.id)
        assert row is not None and row.chain_base == height
        assert pair.sequencer.store.tx_location(stored.tx_hash)[0] == height + 1
        assert (await pair.sequencer.records.read("Patient", stored.id)).data == stored.data
        assert (await pair.worker.records.read("Patient", stored.id)).data == stored.data

    run(root, body)


def test_concurrent_updates_from_worker_and_sequencer_lose_no_version(root: Path) -> None:
    """The per-resource lock is per process: the sequencer's version check catches the
    race (WriteRaced) and the worker seals again on the newer version."""

    async def body(pair: Pair) -> None:
        created = await pair.worker.records.create(_patient("v1"))
        writes = []
        for i in range(6):
            records = pair.worker.records if i % 2 else pair.sequencer.records
            writes.append(records.update("Patient", created.id, _patient(f"n{i}")))
        results = await asyncio.gather(*writes)
        versions = sorted(stored.version for stored, _ in results)
        assert versions == list(range(2, 8))
        history = pair.sequencer.index.history("Patient", created.id)
        assert sorted(row.version for row in history) == list(range(1, 8))
        for row in history:  # every indexed version is on the chain
            pair.sequencer.store.tx_location(row.tx_hash)

    run(root, body)


def test_if_match_still_holds_across_processes(root: Path) -> None:
    async def body(pair: Pair) -> None:
        created = await pair.worker.records.create(_patient("v1"))
        await pair.sequencer.records.update("Patient", created.id, _patient("v2"))
        with pytest.raises(PreconditionFailed):
            await pair.worker.records.update("Patient", created.id, _patient("x"), if_match=1)

    run(root, body)


def test_a_version_sealed_under_a_rotated_key_is_refused_and_the_worker_told(
    root: Path,
) -> None:
    async def body(pair: Pair) -> None:
        node = pair.sequencer
        await node.records.rotate_kek()
        before = sorted(p.name for p in (pair.root / "blobs").rglob("*") if p.is_file())
        with pytest.raises(StaleKeys):
            await pair.worker.records.create(_patient("old key"))
        assert pair.stale_keys == 1
        after = sorted(p.name for p in (pair.root / "blobs").rglob("*") if p.is_file())
        assert after == before  # the sequencer took the sealed blob back

    run(root, body)


def test_the_sequencer_accepts_only_access_entries_in_submit(root: Path) -> None:
    async def body(pair: Pair) -> None:
        chain = pair.worker.chain
        entry = AccessEntry(
            reader="link-hospital",
            holder="link-hospital",
            patient="",
            consent="",
            resource="Patient:" + "ab" * 32,
            outcome="allowed",
        )
        receipt = await chain.submit(ACCESS, entry.private_body())
        assert pair.sequencer.store.tx_location(receipt.tx_hash)[0] == receipt.height
        height = pair.sequencer.chain.head.height
        forged = Transaction(type=RECORD_PUT, chain=chain.chain_id, body={"version": 1}, time_ms=1)
        with pytest.raises(InvalidInput):
            await chain.submit_many([forged])
        assert pair.sequencer.chain.head.height == height

    run(root, body)


def test_a_commit_whose_transaction_does_not_match_its_row_writes_nothing(root: Path) -> None:
    async def body(pair: Pair) -> None:
        created = await pair.worker.records.create(_patient("v1"))
        height = pair.sequencer.chain.head.height
        row = pair.sequencer.index.latest("Patient", created.id)
        assert row is not None
        reader, writer = await asyncio.open_unix_connection(str(pair.root / SOCKET_NAME))
        tx = Transaction(
            type=RECORD_PUT,
            chain=pair.worker.chain.chain_id,
            body={"resource_type": "Patient", "version": 2, "blob": "00" * 32, "patient": None},
            time_ms=1,
        )
        forged = {
            "row": {
                "resource_type": "Patient",
                "id": created.id,
                "version": 2,
                "blob_hash": row.blob_hash.hex(),
                "wrapped_dek": row.wrapped_dek.hex() if row.wrapped_dek else None,
                "kek_id": row.kek_id,
                "patient": row.patient,
                "updated_ms": 1,
                "tx_hash": tx.hash().hex(),
                "deleted": False,
            },
            "tokens": [],
            "tx": tx.to_json(),
        }
        write_frame(writer, {"id": 1, "op": "commit", "versions": [forged]})
        await writer.drain()
        answer = await asyncio.wait_for(read_frame(reader), DEADLINE_S)
        writer.close()
        assert answer is not None and answer["ok"] is False
        assert answer["error"]["type"] == "InvalidInput"
        assert pair.sequencer.chain.head.height == height
        latest = pair.sequencer.index.latest("Patient", created.id)
        assert latest is not None and latest.version == 1

    run(root, body)


def test_an_oversized_frame_ends_the_connection(root: Path) -> None:
    async def body(pair: Pair) -> None:
        reader, writer = await asyncio.open_unix_connection(str(pair.root / SOCKET_NAME))
        writer.write(struct.pack(">I", MAX_FRAME_BYTES + 1))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), DEADLINE_S) == b""  # closed, no answer
        writer.close()
        assert pair.server.refused == 1
        # Other connections are unaffected.
        await pair.worker.records.create(_patient("after"))

    run(root, body)


def test_a_lost_sequencer_fails_the_write_with_503_and_the_worker_reconnects(
    root: Path,
) -> None:
    async def body(pair: Pair) -> None:
        await pair.worker.records.create(_patient("before"))
        await pair.server.close()
        with pytest.raises(SequencerUnavailable):
            await pair.worker.records.create(_patient("while away"))
        assert pair.worker.chain.problem() is not None  # type: ignore[union-attr]
        pair.server = SequencerServer(
            pair.root / SOCKET_NAME,
            chain=pair.sequencer.writer_chain,
            records=pair.sequencer.records,
        )
        await pair.server.start()
        stored = await pair.worker.records.create(_patient("back"))
        assert pair.worker.chain.problem() is None  # type: ignore[union-attr]
        assert (await pair.sequencer.records.read("Patient", stored.id)).version == 1

    run(root, body)


def test_a_write_in_flight_when_the_sequencer_goes_away_fails_with_503(root: Path) -> None:
    """A sequencer that answers nothing and closes: the worker's write fails (503)."""

    async def body(pair: Pair) -> None:
        await pair.server.close()
        path = pair.root / SOCKET_NAME
        got_request = asyncio.Event()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_frame(reader)
            got_request.set()
            await asyncio.sleep(0.05)
            writer.close()

        server = await asyncio.start_unix_server(silent, path=str(path))
        try:
            with pytest.raises(SequencerUnavailable):
                await pair.worker.chain.submit(ACCESS, {"kind": "test"})
            assert got_request.is_set()
        finally:
            server.close()
            await server.wait_closed()
        pair.server = SequencerServer(
            path, chain=pair.sequencer.writer_chain, records=pair.sequencer.records
        )
        await pair.server.start()

    run(root, body)


_CONNECT_AS_NOBODY = """
import os, socket, sys
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(20)
try:
    s.sendall(b"\\x00\\x00\\x00\\x02{}")
    print(repr(s.recv(100)))
except (BrokenPipeError, ConnectionResetError):
    print("b''")
"""


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another user")
def test_a_connection_from_another_user_is_refused(root: Path) -> None:
    # Not under tmp_path: pytest's base directory is owner-only.
    shared = Path(tempfile.mkdtemp(prefix="medledger-link-"))
    shared.chmod(0o777)

    async def body(pair: Pair) -> None:
        # The node directory keeps other users out; here the socket sits where they can
        # reach it, so that the credential check itself is what refuses them.
        server = SequencerServer(
            shared / "seq.sock", chain=pair.sequencer.writer_chain, records=pair.sequencer.records
        )
        await server.start()
        (shared / "seq.sock").chmod(0o777)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _CONNECT_AS_NOBODY,
                str(shared / "seq.sock"),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), DEADLINE_S)
            assert proc.returncode == 0, err
            assert out.strip() == b"b''"  # closed without an answer
            assert server.refused == 1
        finally:
            await server.close()

    try:
        run(root, body)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_an_access_entry_with_free_text_is_refused_and_nothing_written(root: Path) -> None:
    """The link is the worker's only way onto the chain: an access entry must have the
    shape of one the node derives, so a broken or subverted worker cannot write a name
    or a request's words on the private chain."""

    async def body(pair: Pair) -> None:
        chain = pair.worker.chain
        height = pair.sequencer.chain.head.height
        good = AccessEntry(
            reader="link-hospital",
            holder="link-hospital",
            patient="",
            consent="",
            resource="list",
            outcome="allowed",
        ).private_body()
        for bad in (
            {"kind": "test"},  # not an access entry's fields
            {**good, "reason": "Ann Smith, HIV test"},  # free text in a field
            {**good, "extra": "Ann Smith"},  # a field no entry has
            {**good, "outcome": 1},  # not text
        ):
            with pytest.raises(InvalidInput):
                await chain.submit(ACCESS, bad)
        assert pair.sequencer.chain.head.height == height
        await chain.submit(ACCESS, good)

    run(root, body)
