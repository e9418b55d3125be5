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
from collections.abc import Awaitable, Callable, Sequence
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
from medledger.services import sequencer_link
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


def _entry_body(n: int) -> dict[str, Any]:
    return AccessEntry(
        reader="link-hospital",
        holder="link-hospital",
        patient="",
        consent="",
        resource=f"Patient:{n:064x}",
        outcome="allowed",
    ).private_body()


def test_a_frame_of_groups_shares_one_block_and_a_bad_group_fails_alone(root: Path) -> None:
    """``submit_groups`` (decision 0059): the sequencer checks every group on its own; a
    group with free text is refused and writes nothing, the others share one block."""

    async def body(pair: Pair) -> None:
        chain_id = pair.worker.chain.chain_id
        height = pair.sequencer.chain.head.height

        def tx(entry: dict[str, Any]) -> dict[str, Any]:
            return Transaction(type=ACCESS, chain=chain_id, body=entry, time_ms=1).to_json()

        groups = [
            [tx(_entry_body(1))],
            [tx(_entry_body(2)), tx({**_entry_body(3), "reason": "Ann Smith, HIV test"})],
            [tx(_entry_body(4)), tx(_entry_body(5))],
            "not a group",
        ]
        reader, writer = await asyncio.open_unix_connection(str(pair.root / SOCKET_NAME))
        try:
            write_frame(writer, {"id": 7, "op": "submit_groups", "groups": groups})
            await writer.drain()
            answer = await asyncio.wait_for(read_frame(reader), DEADLINE_S)
        finally:
            writer.close()
        assert answer is not None and answer["ok"] is True and answer["id"] == 7
        first, refused, third, malformed = answer["results"]
        assert refused["error"]["type"] == malformed["error"]["type"] == "InvalidInput"
        assert [r["height"] for r in first["receipts"] + third["receipts"]] == [height + 1] * 3
        assert pair.sequencer.chain.head.height == height + 1
        stored = pair.sequencer.store.block(height + 1).tx_data
        assert [Transaction.decode(d).body["resource"] for d in stored] == [
            _entry_body(n)["resource"] for n in (1, 4, 5)
        ]

    run(root, body)


class StandIn:
    """A stand-in sequencer on the real socket: records every frame, holds its answer to
    the first until :attr:`release` is set, and answers each group with receipts whose
    index is the entry's number (``_entry_body``), or an error for entry 66."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.first_seen, self.release = asyncio.Event(), asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (frame := await read_frame(reader)) is not None:
                self.frames.append(frame)
                if len(self.frames) == 1:
                    self.first_seen.set()
                    await self.release.wait()
                results: list[dict[str, Any]] = []
                for group in frame["groups"]:
                    if group[0]["body"]["resource"] == _entry_body(66)["resource"]:
                        results.append({"error": {"type": "InvalidInput", "message": "no"}})
                        continue
                    receipts = [
                        {
                            "height": len(self.frames),
                            "index": int(tx["body"]["resource"][-4:], 16),
                            "tx_hash": "00" * 32,
                        }
                        for tx in group
                    ]
                    results.append({"receipts": receipts})
                write_frame(writer, {"id": frame["id"], "ok": True, "results": results})
                await writer.drain()
        finally:
            writer.close()


def with_stand_in(root: Path, body: Callable[[Pair, StandIn], Awaitable[None]]) -> None:
    async def outer(pair: Pair) -> None:
        await pair.server.close()
        path = pair.root / SOCKET_NAME
        stand_in = StandIn()
        server = await asyncio.start_unix_server(stand_in.serve, path=str(path))
        try:
            await body(pair, stand_in)
        finally:
            server.close()
            await server.wait_closed()
        pair.server = SequencerServer(
            path, chain=pair.sequencer.writer_chain, records=pair.sequencer.records
        )
        await pair.server.start()

    run(root, outer)


def _group(chain_id: str, numbers: Sequence[int]) -> list[Transaction]:
    return [
        Transaction(type=ACCESS, chain=chain_id, body=_entry_body(n), time_ms=1) for n in numbers
    ]


def test_a_worker_sends_what_queued_meanwhile_in_one_frame_and_answers_each_group(
    root: Path,
) -> None:
    """A worker keeps one access frame in flight; the groups queued while it is out go
    together in the next one, and each caller gets its own group's answer (receipts or
    error)."""

    async def body(pair: Pair, stand_in: StandIn) -> None:
        chain = pair.worker.chain
        first = asyncio.ensure_future(chain.submit(ACCESS, _entry_body(1)))
        await asyncio.wait_for(stand_in.first_seen.wait(), DEADLINE_S)
        later = [asyncio.ensure_future(chain.submit(ACCESS, _entry_body(n))) for n in (2, 3, 66)]
        group = asyncio.ensure_future(chain.submit_many(_group(chain.chain_id, (4, 5))))
        await asyncio.sleep(0)  # let every caller queue (no frame can go: one is out)
        stand_in.release.set()
        assert (await asyncio.wait_for(first, DEADLINE_S)).index == 1
        assert [(await asyncio.wait_for(f, DEADLINE_S)).index for f in later[:2]] == [2, 3]
        with pytest.raises(InvalidInput):
            await asyncio.wait_for(later[2], DEADLINE_S)
        assert [r.index for r in await asyncio.wait_for(group, DEADLINE_S)] == [4, 5]
        assert [f["op"] for f in stand_in.frames] == ["submit_groups", "submit_groups"]
        assert [len(f["groups"]) for f in stand_in.frames] == [1, 4]

    with_stand_in(root, body)


def test_a_frame_carries_at_most_max_frame_txs_and_a_larger_group_goes_alone(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sequencer_link, "MAX_FRAME_TXS", 3)

    async def body(pair: Pair, stand_in: StandIn) -> None:
        chain = pair.worker.chain
        first = asyncio.ensure_future(chain.submit(ACCESS, _entry_body(1)))
        await asyncio.wait_for(stand_in.first_seen.wait(), DEADLINE_S)
        queued = [(2, 3), (4, 5), (6,), (7, 8, 9, 10)]
        calls = [
            asyncio.ensure_future(chain.submit_many(_group(chain.chain_id, numbers)))
            for numbers in queued
        ]
        await asyncio.sleep(0)
        stand_in.release.set()
        await asyncio.wait_for(first, DEADLINE_S)
        answers = await asyncio.wait_for(asyncio.gather(*calls), DEADLINE_S)
        assert [[r.index for r in receipts] for receipts in answers] == [list(q) for q in queued]
        sizes = [[len(g) for g in f["groups"]] for f in stand_in.frames]
        assert sizes == [[1], [2], [2, 1], [4]]

    with_stand_in(root, body)


def test_groups_queued_when_the_worker_stops_fail_with_503(root: Path) -> None:
    """A sequencer that never answers, then the worker stops: the group in flight and the
    groups queued behind it all fail (503) instead of waiting forever."""

    async def body(pair: Pair) -> None:
        await pair.server.close()
        path = pair.root / SOCKET_NAME
        got_frame = asyncio.Event()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await read_frame(reader)
                got_frame.set()
                await reader.read()  # until the worker closes its end
            finally:
                writer.close()

        server = await asyncio.start_unix_server(silent, path=str(path))
        try:
            chain = pair.worker.chain
            calls = [asyncio.ensure_future(chain.submit(ACCESS, _entry_body(1)))]
            await asyncio.wait_for(got_frame.wait(), DEADLINE_S)
            calls += [asyncio.ensure_future(chain.submit(ACCESS, _entry_body(n))) for n in (2, 3)]
            await asyncio.sleep(0)
            await chain.close()  # type: ignore[attr-defined]
            outcomes = await asyncio.wait_for(
                asyncio.gather(*calls, return_exceptions=True), DEADLINE_S
            )
            assert all(isinstance(o, SequencerUnavailable) for o in outcomes), outcomes
        finally:
            server.close()
            await server.wait_closed()

    run(root, body)


def test_a_frame_json_cannot_hold_is_refused_before_anything_is_sent(root: Path) -> None:
    async def body(pair: Pair) -> None:
        reader, writer = await asyncio.open_unix_connection(str(pair.root / SOCKET_NAME))
        try:
            for value in ({"id": 1, "op": "x\ud800"}, {"id": 2**70, "op": "spend"}):
                with pytest.raises(InvalidInput):
                    write_frame(writer, value)
            assert writer.transport.get_write_buffer_size() == 0
            write_frame(writer, {"id": 3, "op": "no such op"})
            await writer.drain()
            answer = await asyncio.wait_for(read_frame(reader), DEADLINE_S)
            assert answer is not None and answer["id"] == 3 and answer["ok"] is False
        finally:
            writer.close()

    run(root, body)
