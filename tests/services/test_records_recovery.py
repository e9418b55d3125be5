"""A crash between a write's index commit and its chain commit leaves nothing behind.

A child process writes version 1 of a Patient (acknowledged), then dies
(``os._exit``) inside the chain commit of version 2 — after version 2's
index row, search tokens and blob were made durable. The reopened node must
answer as if version 2 never happened: it was never acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from node_files import blob_names, node_state

from medledger.core.errors import DamagedStore, StorageError
from medledger.ledger.verify import verify_chain
from medledger.node import init_node, open_chain, open_node
from medledger.storage.keystore import KdfParams
from medledger.synthetic import generate_patient

PW = b"records test passphrase"
PATIENT = generate_patient(0, seed=5, resources_per_patient=0).patient
GENDERS = ("male", "female", "other")

CHILD = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from pathlib import Path
    from medledger.node import open_node

    async def main(root, patient):
        node = open_node(Path(root), b"records test passphrase")
        await node.records.update("Patient", patient["id"], patient)
        print("acked v1", flush=True)

        async def crash(txs):
            os._exit(17)  # the process dies before the block is written

        node.chain.submit_many = crash
        changed = dict(patient, gender="other" if patient.get("gender") != "other" else "male")
        await node.records.update("Patient", patient["id"], changed)

    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
    """
)


def _crashed_mid_write(tmp_path: Path) -> tuple[Path, subprocess.CompletedProcess[bytes]]:
    """A node whose child process acknowledged version 1 and died inside version 2's commit."""
    root = tmp_path / "node"
    init_node(root, name="Crash Test", passphrase=PW, kdf=KdfParams(n=2**12))
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), json.dumps(PATIENT)],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 17, child.stderr.decode()
    return root, child


def test_an_unacknowledged_version_is_taken_back_after_a_crash(tmp_path: Path) -> None:
    root, child = _crashed_mid_write(tmp_path)
    assert b"acked v1" in child.stdout
    blobs_after_crash = blob_names(root)
    assert len(blobs_after_crash) == 2  # v2's blob was durable before the crash

    async def reopen() -> None:
        node = open_node(root, PW)
        try:
            assert [r.version for r in node.index.history("Patient", PATIENT["id"])] == [2, 1]
            stored = await node.records.read("Patient", PATIENT["id"])
            assert stored.version == 1
            assert stored.resource()["gender"] == PATIENT["gender"]
            assert [v.version for v in await node.records.history("Patient", PATIENT["id"])] == [1]
            # Search answers from version 1's tokens again.
            found = await node.records.search("Patient", {"gender": [PATIENT["gender"]]})
            assert [s.id for s in found] == [PATIENT["id"]]
            assert await node.records.recover() == 0  # nothing left to take back
            # The next write is version 2 again, and it commits.
            written, _ = await node.records.update(
                "Patient", PATIENT["id"], dict(PATIENT, gender="unknown")
            )
            assert written.version == 2
        finally:
            await node.close()

    asyncio.run(reopen())
    assert len(blob_names(root)) == 2  # the orphan blob went, the new v2 blob came
    assert blob_names(root) != blobs_after_crash
    config, store = open_chain(root)
    try:
        verify_chain(store, expected_key=config.signing_key)
    finally:
        store.close()


# -- recovery that does not depend on clocks, and never deletes on a damaged chain ----------

EXCURSION_CHILD = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from pathlib import Path
    from medledger.node import open_node

    class JumpingClock:
        offset = 0
        def now_ms(self):
            import time
            return time.time_ns() // 1_000_000 + self.offset

    async def main(root, first, second):
        clock = JumpingClock()
        node = open_node(Path(root), b"records test passphrase", clock=clock)
        clock.offset = 24 * 3600 * 1000  # the clock jumps a day ahead for one write ...
        await node.records.update("Patient", first["id"], first)
        clock.offset = 0  # ... and back: block times stay pinned at the excursion
        await node.records.update("Patient", second["id"], second)
        print("acked", flush=True)

        async def crash(txs):
            os._exit(17)

        node.chain.submit_many = crash
        await node.records.update("Patient", second["id"], dict(second, gender="unknown"))

    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])))
    """
)


def _crash_child(root: Path, script: str, *args: str) -> None:
    child = subprocess.run(
        [sys.executable, "-c", script, str(root), *args],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 17, child.stderr.decode()
    assert b"acked" in child.stdout


def test_recovery_after_a_clock_excursion_still_takes_back_the_orphan(tmp_path: Path) -> None:
    """Old code looked only at rows newer than head time - 10 min; after a clock jump
    forward the orphan was older than that window, stayed, and reads answered 500."""
    root = tmp_path / "node"
    init_node(root, name="Clock Test", passphrase=PW, kdf=KdfParams(n=2**12))
    first, second = (generate_patient(i, seed=7, resources_per_patient=0).patient for i in range(2))
    _crash_child(root, EXCURSION_CHILD, json.dumps(first), json.dumps(second))

    async def reopen() -> None:
        node = open_node(root, PW)
        try:
            assert [r.version for r in node.index.history("Patient", second["id"])] == [2, 1]
            stored = await node.records.read("Patient", second["id"])
            assert stored.version == 1 and stored.resource()["gender"] == second["gender"]
            assert [r.version for r in node.index.history("Patient", second["id"])] == [1]
        finally:
            await node.close()

    asyncio.run(reopen())
    assert len(blob_names(root)) == 2  # the orphan's blob went; both acked blobs stayed


def _tamper_record_put(root: Path, *, version: int) -> None:
    """Change one hex digit of the blob hash in a committed ``record.put`` (version ``version``)."""
    conn = sqlite3.connect(root / "chain.db")
    try:
        for idx, data in conn.execute("SELECT idx, data FROM txs ORDER BY idx"):
            tx = json.loads(bytes(data))
            if tx["type"] == "record.put" and tx["body"]["version"] == version:
                blob = tx["body"]["blob"]
                changed = bytes(data).replace(
                    blob.encode(), (("0" if blob[0] != "0" else "1") + blob[1:]).encode()
                )
                conn.execute("UPDATE txs SET data = ? WHERE idx = ?", (changed, idx))
                conn.commit()
                return
    finally:
        conn.close()
    raise AssertionError("no record.put to tamper with")


def test_a_damaged_chain_is_refused_at_open_and_nothing_is_taken_back(tmp_path: Path) -> None:
    """Old code: the changed tx no longer matched its hash, recovery 'took back' the
    committed version (row and blob deleted) and the record answered 404."""
    root = tmp_path / "node"
    init_node(root, name="Tamper Test", passphrase=PW, kdf=KdfParams(n=2**12))

    async def write() -> None:
        node = open_node(root, PW)
        try:
            await node.records.update("Patient", PATIENT["id"], PATIENT)
            # A crash-like orphan: indexed, never committed, mark not advanced.
            node.chain.submit_many = _never_commits  # type: ignore[method-assign]
            with pytest.raises(StorageError):
                await node.records.update("Patient", PATIENT["id"], dict(PATIENT, gender="other"))
        finally:
            await node.close()

    asyncio.run(write())
    _tamper_record_put(root, version=1)
    before = node_state(root)
    with pytest.raises(DamagedStore, match=r"block 1: .*tx_root.*docs/reliability\.md"):
        open_node(root, PW)
    assert node_state(root) == before  # the row, its tokens and its blob are all still there


async def _never_commits(*args: object) -> None:
    raise StorageError("disk full")


def test_a_chain_behind_the_index_is_refused(tmp_path: Path) -> None:
    """Versions indexed on a height the chain no longer has: committed blocks were lost."""
    root = tmp_path / "node"
    init_node(root, name="Behind Test", passphrase=PW, kdf=KdfParams(n=2**12))

    async def write() -> None:
        node = open_node(root, PW)
        try:
            for i in range(3):
                await node.records.update(
                    "Patient", PATIENT["id"], dict(PATIENT, gender=GENDERS[i])
                )
        finally:
            await node.close()

    asyncio.run(write())
    conn = sqlite3.connect(root / "chain.db")
    try:  # as a lost WAL would: the newest blocks are gone
        first = conn.execute("SELECT first_index FROM blocks WHERE height = 2").fetchone()[0]
        conn.execute("DELETE FROM blocks WHERE height >= 2")
        conn.execute("DELETE FROM txs WHERE idx >= ?", (first,))
        conn.commit()
    finally:
        conn.close()
    before = node_state(root)
    with pytest.raises(DamagedStore, match=r"ends at height 1.*acknowledged blocks were lost"):
        open_node(root, PW)
    assert node_state(root) == before


def test_a_failed_take_back_is_retried_before_the_next_write(tmp_path: Path) -> None:
    """A commit and its take-back both failing (disk full) leaves an orphan row; the next
    write takes it back first instead of building version 3 over it."""
    root = tmp_path / "node"
    init_node(root, name="Stuck Test", passphrase=PW, kdf=KdfParams(n=2**12))

    async def go() -> None:
        node = open_node(root, PW)
        try:
            await node.records.update("Patient", PATIENT["id"], PATIENT)
            chain_submit = node.chain.submit_many
            index_remove = node.index.remove_version
            node.chain.submit_many = _never_commits  # type: ignore[method-assign]
            node.index.remove_version = _never_commits  # type: ignore[assignment,method-assign]
            with pytest.raises(StorageError):
                await node.records.update("Patient", PATIENT["id"], dict(PATIENT, gender="other"))
            assert [r.version for r in node.index.history("Patient", PATIENT["id"])] == [2, 1]
            node.chain.submit_many = chain_submit  # type: ignore[method-assign]
            node.index.remove_version = index_remove  # type: ignore[method-assign]
            written, _ = await node.records.update(
                "Patient", PATIENT["id"], dict(PATIENT, gender="unknown")
            )
            assert written.version == 2
            assert (await node.records.read("Patient", PATIENT["id"])).resource()[
                "gender"
            ] == "unknown"
        finally:
            await node.close()

    asyncio.run(go())


def test_the_recovery_mark_moves_up_while_the_node_runs(tmp_path: Path) -> None:
    """A crash after a long run re-checks only the blocks since the last mark, not every
    block since the node started; the mark never passes a write still in flight."""
    root = tmp_path / "node"
    init_node(root, name="Mark Test", passphrase=PW, kdf=KdfParams(n=2**12))

    async def go() -> None:
        node = open_node(root, PW)
        node.records.recovery.mark_every = 2
        try:
            for i in range(5):
                await node.records.update(
                    "Patient", PATIENT["id"], dict(PATIENT, gender=GENDERS[i % 3])
                )
            mark = node.index.recovery_mark()
            assert 0 < mark <= node.chain.durable_height
            assert mark >= node.chain.durable_height - 2
        finally:
            await node.close()

    asyncio.run(go())


def test_the_store_scrub_waits_for_crash_recovery(tmp_path: Path) -> None:
    """The scrub's first pass at start must not read a crash's leftover as damage:
    that row is crash recovery's to take back, and reported as damage it kept
    ``/readyz`` at 503 until the next pass, an hour later."""
    root = tmp_path / "node"
    init_node(root, name="Crash Test", passphrase=PW, kdf=KdfParams(n=2**12))
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), json.dumps(PATIENT)],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 17, child.stderr.decode()

    async def reopen() -> None:
        node = open_node(root, PW)
        try:
            scrub = node.start_store_scrub(interval_s=3600, rows_per_s=10_000)
            for _ in range(600):  # bounded: 30 s
                if node.store_health.scrub_passes >= 1:
                    break
                await asyncio.sleep(0.05)
            assert node.store_health.scrub_passes >= 1
            assert node.store_health.damage == ()
            assert node.store_health.problems() == []
            assert [r.version for r in node.index.history("Patient", PATIENT["id"])] == [1]
            await scrub.close()
        finally:
            await node.close()

    asyncio.run(reopen())
