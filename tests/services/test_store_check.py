"""The record store check, the orphan sweep and the scrub on a real node directory:
each kind of damage is found and named without PHI, a missing blob reads as damage
(never "not found"), and the sweep removes only blobs nothing committed references."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

from medledger.core.errors import NotFound, RecordDamaged
from medledger.node import Node, init_node, open_node
from medledger.services.store_check import (
    StoreReport,
    StoreScrub,
    check_store,
    collect_orphan_blobs,
)
from medledger.storage.blobs import FileBlobStore
from medledger.storage.keystore import KdfParams
from medledger.storage.ports import VersionRow

T = TypeVar("T")
PW = b"store check test passphrase"
#: A name that must never appear in a problem description, a log line or an error.
SECRET_NAME = "Zyxwvutsrq"


def run(root: Path, fn: Callable[[Node], Awaitable[T]]) -> T:
    async def go() -> T:
        node = open_node(root, PW)
        try:
            return await fn(node)
        finally:
            await node.close()

    return asyncio.run(go())


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A node with Patient p1 (v1, v2), p2 (v1) and p3 (v1, erased)."""
    root = tmp_path / "n"
    init_node(root, name="Check Test", passphrase=PW, kdf=KdfParams(n=2**12))

    async def write(node: Node) -> None:
        patient = {"resourceType": "Patient", "name": [{"family": SECRET_NAME}]}
        await node.records.update("Patient", "p1", patient)
        await node.records.update("Patient", "p1", {**patient, "gender": "female"})
        await node.records.update("Patient", "p2", patient)
        await node.records.update("Patient", "p3", patient)
        await node.records.erase("Patient", "p3")

    run(root, write)
    return root


def check(root: Path) -> StoreReport:
    async def go(node: Node) -> StoreReport:
        return node.check_records()

    return run(root, go)


def blob_file(root: Path, rid: str, version: int) -> Path:
    conn = sqlite3.connect(root / "records.db")
    try:
        (blob,) = conn.execute(
            "SELECT blob_hash FROM versions WHERE rid = ? AND version = ?", (rid, version)
        ).fetchone()
    finally:
        conn.close()
    return root / "blobs" / blob.hex()[:2] / blob.hex()


def sql(root: Path, statement: str, *args: object) -> int:
    conn = sqlite3.connect(root / "records.db")
    try:
        with conn:
            return conn.execute(statement, args).rowcount
    finally:
        conn.close()


def kinds(report: StoreReport) -> list[tuple[str, int]]:
    return sorted((p.kind, p.version) for p in report.problems)


def test_a_sound_store_passes(root: Path) -> None:
    report = check(root)
    assert report.ok and report.problems == ()
    assert (report.versions, report.erased, report.record_txs) == (4, 1, 4)
    assert report.orphan_blobs == 0


def test_flipped_blob_byte(root: Path) -> None:
    path = blob_file(root, "p1", 2)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert kinds(check(root)) == [("blob-altered", 2)]


def test_deleted_blob(root: Path) -> None:
    blob_file(root, "p2", 1).unlink()
    report = check(root)
    assert kinds(report) == [("blob-missing", 1)]
    text = report.problems[0].describe()
    assert "Patient record" in text and "p2" not in text and SECRET_NAME not in text


def test_flipped_wrapped_key(root: Path) -> None:
    conn = sqlite3.connect(root / "records.db")
    try:
        (key,) = conn.execute(
            "SELECT wrapped_dek FROM versions WHERE rid = 'p1' AND version = 1"
        ).fetchone()
    finally:
        conn.close()
    flipped = bytearray(key)
    flipped[20] ^= 0x01
    assert sql(
        root,
        "UPDATE versions SET wrapped_dek = ? WHERE rid = 'p1' AND version = 1",
        bytes(flipped),
    )
    assert kinds(check(root)) == [("key-does-not-unwrap", 1)]


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("UPDATE versions SET patient = 'someone-else' WHERE rid = 'p2'", ["index-mismatch"]),
        ("UPDATE versions SET version = 7 WHERE rid = 'p2'", ["index-mismatch"]),
        # The row no longer names its record.put, and the record.put has no row.
        (
            "UPDATE versions SET tx_hash = zeroblob(32) WHERE rid = 'p2'",
            ["index-row-missing", "tx-missing"],
        ),
    ],
)
def test_damaged_index_row(root: Path, statement: str, expected: list[str]) -> None:
    assert sql(root, statement) == 1
    assert sorted(kind for kind, _ in kinds(check(root))) == expected


def test_lost_index_row_is_reported(root: Path) -> None:
    """What a truncated records.db-wal does: the record.put stays, its row is gone."""
    assert sql(root, "DELETE FROM versions WHERE rid = 'p1' AND version = 2") == 1
    report = check(root)
    assert kinds(report) == [("index-row-missing", 2)]
    assert "acknowledged write is lost" in report.problems[0].detail
    # Its blob is referenced by the chain: not an orphan.
    assert report.orphan_blobs == 0


def test_missing_blob_reads_as_damage_not_absence(root: Path) -> None:
    blob_file(root, "p1", 2).unlink()

    async def go(node: Node) -> int:
        for read in (
            node.records.read("Patient", "p1"),
            node.records.vread("Patient", "p1", 2),
        ):
            with pytest.raises(RecordDamaged) as exc:
                await read
            assert not isinstance(exc.value, NotFound)
            assert "blob is missing" in str(exc.value)
            assert "p1" not in str(exc.value) and SECRET_NAME not in str(exc.value)
        with pytest.raises(RecordDamaged):
            await node.records.sealed_version("Patient", "p1")
        # The intact version is still served; an unknown id is still "not found".
        assert (await node.records.vread("Patient", "p1", 1)).version == 1
        with pytest.raises(NotFound):
            await node.records.read("Patient", "never-written")
        return node.store_health.integrity_errors

    assert run(root, go) == 3


def test_orphan_sweep_removes_only_unreferenced_old_blobs(root: Path) -> None:
    blobs = FileBlobStore(root / "blobs")
    orphan = blobs.put(b"ciphertext of a write that never reached the index")
    fresh_orphan = blobs.put(b"ciphertext of a write in flight")
    # p1 v2 loses its index row: the chain still references its blob.
    committed = blob_file(root, "p1", 2)
    assert sql(root, "DELETE FROM versions WHERE rid = 'p1' AND version = 2") == 1
    cutoff = time.time() + 60  # everything so far counts as "before this process"
    orphan_path = root / "blobs" / orphan.hex()[:2] / orphan.hex()
    fresh_path = root / "blobs" / fresh_orphan.hex()[:2] / fresh_orphan.hex()
    os.utime(fresh_path, (cutoff + 10, cutoff + 10))

    async def go(node: Node) -> int:
        return collect_orphan_blobs(
            index=node.index, blobs=blobs, chain=node.store, older_than=cutoff
        )

    assert run(root, go) == 1
    assert not orphan_path.exists()
    assert fresh_path.exists() and committed.exists()
    for rid, version in (("p1", 1), ("p2", 1)):
        assert blob_file(root, rid, version).exists()


def test_scrub_marks_damage_and_clears_when_repaired(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = blob_file(root, "p2", 1)
    saved = path.read_bytes()
    path.unlink()
    stale = path.parent / f".{path.name}.deadbeef.tmp"
    stale.write_bytes(b"")

    async def go(node: Node) -> None:
        scrub = node.start_store_scrub(interval_s=0.05, rows_per_s=10_000)
        await _until(lambda: node.store_health.scrub_passes >= 1)
        assert node.store_health.damage and "blob is missing" in node.store_health.damage[0]
        problems = node.store_health.problems()
        assert any("store is damaged" in p for p in problems)
        assert stale.exists()  # made by this process: not stale for it
        path.write_bytes(saved)  # the operator restores the blob
        seen = node.store_health.scrub_passes
        await _until(lambda: node.store_health.scrub_passes > seen + 1)
        assert node.store_health.damage == ()
        assert node.store_health.problems() == []
        await scrub.close()

    with caplog.at_level("WARNING", logger="medledger.store"):
        run(root, go)
    assert "blob is missing" in caplog.text
    assert SECRET_NAME not in caplog.text and "p2" not in caplog.text


def test_scrub_pass_removes_leftovers_of_earlier_processes(root: Path) -> None:
    blobs = FileBlobStore(root / "blobs")
    orphan = blobs.put(b"left by a crashed write")
    orphan_path = root / "blobs" / orphan.hex()[:2] / orphan.hex()
    stale = orphan_path.parent / f".{orphan.hex()}.0badc0de"
    stale.write_bytes(b"")
    for p in (orphan_path, stale):
        os.utime(p, (1_000_000, 1_000_000))  # long before this process started

    async def go(node: Node) -> StoreReport:
        scrub = StoreScrub(
            institution=node.config.institution,
            index=node.index,
            blobs=blobs,
            chain=node.store,
            keys=node._institution_keys(),
            health=node.store_health,
            interval_s=3600,
            rows_per_s=10_000,
        )
        try:
            return await asyncio.to_thread(scrub.run_pass)
        finally:
            await scrub.close()

    report = run(root, go)
    assert report.ok and report.orphan_blobs == 1  # counted, then swept
    assert not orphan_path.exists() and not stale.exists()
    assert check(root).orphan_blobs == 0


async def _until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_a_row_that_looked_wrong_is_checked_again_before_it_is_reported(root: Path) -> None:
    """What a write in flight or an erasure looks like for a moment is not reported."""
    path = blob_file(root, "p2", 1)
    saved = path.read_bytes()
    path.unlink()
    settled: list[list[tuple[str, int]]] = []

    def settle(rows: Sequence[VersionRow]) -> None:  # meanwhile, the blob is back
        path.write_bytes(saved)
        settled.append([(r.id, r.version) for r in rows])

    async def go(node: Node) -> StoreReport:
        return check_store(
            institution=node.config.institution,
            index=node.index,
            blobs=FileBlobStore(root / "blobs"),
            chain=node.store,
            keys=node._institution_keys(),
            settle=settle,
        )

    report = run(root, go)
    assert settled == [[("p2", 1)]] and report.ok


def test_a_check_while_writes_go_on_reports_nothing(root: Path) -> None:
    async def go(node: Node) -> tuple[StoreReport, int]:
        stop = False

        async def writer() -> int:
            n = 0
            while not stop:
                await node.records.update("Patient", f"w{n}", {"resourceType": "Patient"})
                if n % 3 == 0:
                    await node.records.erase("Patient", f"w{n}")
                n += 1
            return n

        task = asyncio.create_task(writer())
        reports = []
        for _ in range(3):
            reports.append(await asyncio.to_thread(node.check_records))
        stop = True
        written = await task
        bad = [r for r in reports if not r.ok]
        return (bad[0] if bad else reports[-1]), written

    report, written = run(root, go)
    assert written > 0
    assert report.ok, [p.describe() for p in report.problems]
