"""The order of a write's durable steps: blob and index row together, then the block.

A write's index commit runs while its blob is flushed (both unacknowledged,
so either may land first), and its chain block is written only once both are
durable, so the chain never names a blob that is not on disk. A failure of
either takes the other back; a crash between them leaves a row that recovery
proves uncommitted and takes back.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest
from node_files import blob_names, node_state

from medledger.core.errors import NotFound, StorageError
from medledger.ledger.verify import verify_chain
from medledger.node import Node, init_node, open_chain, open_node
from medledger.storage.keystore import KdfParams
from medledger.storage.ports import VersionRow
from medledger.synthetic import generate_patient

PW = b"records test passphrase"
PATIENT = generate_patient(0, seed=7, resources_per_patient=0).patient
#: Longest wait for a step another thread or process takes (a failure, never a pass).
DEADLINE_S = 10.0


def _other_gender(patient: dict[str, object]) -> dict[str, object]:
    return dict(patient, gender="other" if patient.get("gender") != "other" else "male")


def _new_node(root: Path) -> Path:
    init_node(root, name="Write Order", passphrase=PW, kdf=KdfParams(n=2**12))
    return root


def _poll(condition: Callable[[], bool], what: str, give_up: threading.Event | None = None) -> None:
    """Wait (bounded, or until ``give_up`` is set) until ``condition()`` holds, from any thread."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline or (give_up is not None and give_up.is_set()):
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.005)


def _on_version_1(root: Path, body: Callable[[Node], Awaitable[None]]) -> None:
    """Open the node, write version 1 of the patient, run ``body``, close the node."""

    async def go() -> None:
        node = open_node(root, PW)
        try:
            await node.records.update("Patient", PATIENT["id"], PATIENT)
            await node.records.tokens_settled()
            await body(node)
        finally:
            await node.close()

    asyncio.run(go())


def _v2_indexed(node: Node) -> bool:
    return node.index.get_version("Patient", PATIENT["id"], 2) is not None


def _hold_blob_flush(
    node: Node,
    monkeypatch: pytest.MonkeyPatch,
    then: Callable[[], None],
    give_up: threading.Event | None = None,
) -> None:
    """Make the node's next blob write wait, on the blob thread, until version 2's index
    row is durable; then run ``then`` there (raise to fail the flush), then store."""
    blobs = node._blobs
    real_put_many = blobs.put_many

    def held_put_many(data: Sequence[bytes]) -> list[bytes]:
        _poll(lambda: _v2_indexed(node), "version 2 is indexed while its blob is flushed", give_up)
        then()
        return real_put_many(data)

    monkeypatch.setattr(blobs, "put_many", held_put_many)


def test_the_index_commit_overlaps_the_blob_flush_and_the_block_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _new_node(tmp_path / "n")
    release = threading.Event()
    heights_while_held: list[int] = []

    async def go(node: Node) -> None:
        height = node.chain.durable_height

        def hold() -> None:
            # The row is durable and the blob not yet: the block must not exist.
            heights_while_held.append(node.chain.durable_height)
            assert release.wait(DEADLINE_S), "the test never released the flush"

        _hold_blob_flush(node, monkeypatch, hold, give_up=release)
        write = asyncio.create_task(
            node.records.update("Patient", PATIENT["id"], _other_gender(PATIENT))
        )
        try:
            await asyncio.to_thread(
                _poll, lambda: bool(heights_while_held), "the index row is durable"
            )
            await asyncio.sleep(0.05)  # a block written early would have had time to land
            assert node.chain.durable_height == height
            assert not write.done()
        finally:
            release.set()  # also ends a held flush that waits in vain
            done, _ = await asyncio.wait([write], timeout=DEADLINE_S)
        assert write in done
        stored, _ = write.result()
        assert stored.version == 2
        assert heights_while_held == [height]
        assert node.chain.durable_height == height + 1
        assert (await node.records.read("Patient", PATIENT["id"])).version == 2

    _on_version_1(root, go)
    config, store = open_chain(root)
    try:
        verify_chain(store, expected_key=config.signing_key)
    finally:
        store.close()


def test_a_failed_blob_flush_takes_back_the_row_indexed_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _new_node(tmp_path / "n")

    async def go(node: Node) -> None:
        before = node_state(root)

        def fail() -> None:
            raise StorageError("the disk went away")

        _hold_blob_flush(node, monkeypatch, fail)
        with pytest.raises(StorageError, match="disk went away"):
            await node.records.update("Patient", PATIENT["id"], _other_gender(PATIENT))
        assert not _v2_indexed(node)
        assert node_state(root) == before, "the failed write left something behind"
        stored = await node.records.read("Patient", PATIENT["id"])
        assert stored.version == 1
        found = await node.records.search("Patient", {"gender": [PATIENT["gender"]]})
        assert [s.id for s in found] == [PATIENT["id"]]

    _on_version_1(root, go)


def test_a_failed_index_commit_removes_the_blob_stored_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _new_node(tmp_path / "n")

    async def go(node: Node) -> None:
        before = node_state(root)
        blob_writes: list[int] = []
        blobs = node._blobs
        real_put_many = blobs.put_many

        def counted_put_many(data: Sequence[bytes]) -> list[bytes]:
            hashes = real_put_many(data)
            blob_writes.append(len(data))
            return hashes

        async def failing_put_version(row: VersionRow, tokens: set[bytes]) -> None:
            raise StorageError("the index is full")

        monkeypatch.setattr(blobs, "put_many", counted_put_many)
        monkeypatch.setattr(node.index, "put_version", failing_put_version)
        with pytest.raises(StorageError, match="index is full"):
            await node.records.update("Patient", PATIENT["id"], _other_gender(PATIENT))
        assert blob_writes == [1]  # the blob was stored beside the failing index commit
        assert node_state(root) == before, "the failed write left its blob behind"
        assert (await node.records.read("Patient", PATIENT["id"])).version == 1

    _on_version_1(root, go)


CRASH_CHILD = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    from pathlib import Path
    from medledger.node import open_node

    async def main(root, patient):
        node = open_node(Path(root), b"records test passphrase")
        await node.records.update("Patient", patient["id"], patient)
        print("acked v1", flush=True)

        def die_in_flush(blobs):
            deadline = time.monotonic() + 10
            while node.index.get_version("Patient", patient["id"], 2) is None:
                if time.monotonic() > deadline:
                    os._exit(18)  # version 2 was not indexed while its blob was flushed
                time.sleep(0.005)
            os._exit(17)  # the process dies before the blob is durable

        node._blobs.put_many = die_in_flush
        changed = dict(patient, gender="other" if patient.get("gender") != "other" else "male")
        await node.records.update("Patient", patient["id"], changed)

    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
    """
)


def test_a_crash_during_the_blob_flush_leaves_a_row_that_recovery_takes_back(
    tmp_path: Path,
) -> None:
    root = _new_node(tmp_path / "n")
    child = subprocess.run(
        [sys.executable, "-c", CRASH_CHILD, str(root), json.dumps(PATIENT)],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 17, child.stderr.decode()[-2000:]
    assert b"acked v1" in child.stdout

    async def reopen() -> None:
        node = open_node(root, PW)
        try:
            # Version 2's row survived the crash; its blob and its block never existed.
            assert [r.version for r in node.index.history("Patient", PATIENT["id"])] == [2, 1]
            assert len(blob_names(root)) == 1
            stored = await node.records.read("Patient", PATIENT["id"])  # recovers first
            assert stored.version == 1
            assert [r.version for r in node.index.history("Patient", PATIENT["id"])] == [1]
            assert await node.records.recover() == 0  # nothing left to take back
            written, _ = await node.records.update("Patient", PATIENT["id"], _other_gender(PATIENT))
            assert written.version == 2
        finally:
            await node.close()

    asyncio.run(reopen())
    config, store = open_chain(root)
    try:
        verify_chain(store, expected_key=config.signing_key)
    finally:
        store.close()


@pytest.mark.parametrize("outcome", ["committed", "failed"])
def test_a_read_meeting_a_write_in_flight_waits_for_its_outcome_and_finds_no_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outcome: str
) -> None:
    """Between a version's index commit and its block, reads wait for the write's outcome.

    A committed write is then read as the new version; a failed one as what was there
    before (read), or as no such version (vread, history). A search waits too (the
    version is pending its tokens), then finds what survived: a failed version never
    replaced the resource's tokens (decision 0069). Neither is damage: no integrity
    error is counted, and the event loop keeps running while the reads wait.
    """
    root = _new_node(tmp_path / "n")
    release = threading.Event()
    held: list[bool] = []

    async def go(node: Node) -> None:

        def hold() -> None:
            held.append(True)
            assert release.wait(DEADLINE_S), "the test never released the flush"
            if outcome == "failed":
                raise StorageError("the disk went away")

        _hold_blob_flush(node, monkeypatch, hold, give_up=release)
        write = asyncio.create_task(
            node.records.update("Patient", PATIENT["id"], _other_gender(PATIENT))
        )
        try:
            await asyncio.to_thread(_poll, lambda: bool(held), "version 2 is indexed")
            read = asyncio.create_task(node.records.read("Patient", PATIENT["id"]))
            vread = asyncio.create_task(node.records.vread("Patient", PATIENT["id"], 2))
            history = asyncio.create_task(node.records.history("Patient", PATIENT["id"]))
            search = asyncio.create_task(node.records.search("Patient", {"_id": [PATIENT["id"]]}))
            reads = [read, vread, history, search]
            await asyncio.sleep(0.1)  # the loop runs: the reads wait off it
            assert not any(r.done() for r in reads)
        finally:
            release.set()
            done, _ = await asyncio.wait([write, *reads], timeout=DEADLINE_S)
        assert len(done) == 5
        if outcome == "committed":
            assert write.result()[0].version == 2
            assert read.result().version == 2
            assert vread.result().data == (await node.records.read("Patient", PATIENT["id"])).data
            assert [v.version for v in history.result()] == [2, 1]
            assert [s.version for s in search.result()] == [2]
        else:
            assert isinstance(write.exception(), StorageError)
            assert read.result().version == 1
            assert isinstance(vread.exception(), NotFound)
            assert [v.version for v in history.result()] == [1]
            assert [s.version for s in search.result()] == [1]
        assert node.store_health.integrity_errors == 0

    _on_version_1(root, go)
