"""Disk faults on real node directories and a real ``medledger node start`` process.

* A full disk (a small tmpfs; skipped with the reason where ``mount`` is not
  allowed): a write that runs out of space mid-blob answers 507 and leaves
  nothing behind, ``/readyz`` answers 503 while the disk is full, and once
  space is back the node serves again — every acknowledged record intact,
  ``verify --records`` clean.
* Byte flips and deletions in blobs, wrapped keys and index rows, and a
  truncated ``records.db-wal``: ``medledger verify --records`` names each and
  exits 3, without PHI.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cli_support import medledger_command, start_node_process
from medledger.core.errors import StorageFull
from medledger.localnet.natsserver import free_ports
from medledger.node import Node, init_node, open_node
from medledger.storage.keystore import KdfParams
from medledger.storage.ports import VersionRow
from medledger.storage.sqlite.records import SqliteRecordIndex
from medledger.storage.sqlite.tokens import SqliteTokenStore

PASSPHRASE = "disk faults passphrase"
FHIR_JSON = "application/fhir+json"
#: A name that must never appear in any output.
SECRET = "Mxyzptlkfamily"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDLEDGER_")}
    env["MEDLEDGER_PASSPHRASE"] = PASSPHRASE
    env.update(extra)
    return env


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*medledger_command(), *(str(a) for a in args)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
        check=False,
    )


def _new_node(root: Path) -> None:
    init_node(root, name="Disk Faults", passphrase=PASSPHRASE.encode(), kdf=KdfParams(n=2**12))


def _patient(n: int, text_bytes: int = 0) -> dict[str, object]:
    resource: dict[str, object] = {
        "resourceType": "Patient",
        "name": [{"family": f"{SECRET}{n}"}],
        "gender": "female",
    }
    if text_bytes:
        div = '<div xmlns="http://www.w3.org/1999/xhtml">' + "x" * text_bytes + "</div>"
        resource["text"] = {"status": "generated", "div": div}
    return resource


def _until(condition: object, what: str, timeout: float = 30) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.05)


# -- a full disk ------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs mounted for this test (unmounted afterwards, even on failure)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: the disk-full test needs a small tmpfs")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False, capture_output=True)
        if os.path.ismount(mount):
            subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)


def _fill(disk: Path) -> Path:
    """Fill the file system completely with one file; returns it."""
    filler = disk / "filler"
    chunk = b"\0" * (1 << 16)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        # Pages of the last, partial chunk: write byte by byte until nothing fits.
        while True:
            try:
                os.write(fd, b"\0" * 512)
            except OSError:
                break
    finally:
        os.close(fd)
    return filler


def test_disk_full_mid_blob_answers_507_loses_nothing_and_recovers(small_disk: Path) -> None:
    root = small_disk / "node"
    _new_node(root)
    tokens = SqliteTokenStore(root / "tokens.db")
    try:
        token, _ = tokens.create(role="clinician", now_ms=time.time_ns() // 1_000_000)
    finally:
        tokens.close()
    (port,) = free_ports(1)
    log = small_disk.parent / "node.log"
    env = _env(MEDLEDGER_MIN_FREE_BYTES=str(1 << 20), MEDLEDGER_SCRUB_INTERVAL_S="0")
    proc = start_node_process(root, port, log, env, "--plain-http")
    url = f"http://127.0.0.1:{port}"
    try:
        client = httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON},
            timeout=30,
        )

        def ready() -> int:
            try:
                return client.get("/readyz").status_code
            except httpx.TransportError:
                assert proc.poll() is None, log.read_text()
                return 0

        _until(lambda: ready() == 200, "the node answering /readyz 200")
        acked: dict[str, dict[str, object]] = {}
        for n in range(5):
            answer = client.post("/fhir/Patient", content=json.dumps(_patient(n)))
            assert answer.status_code == 201, answer.text
            acked[answer.json()["id"]] = answer.json()
        blobs_before = sorted(p.name for p in (root / "blobs").rglob("*") if p.is_file())
        assert len(blobs_before) == 5

        filler = _fill(small_disk)
        answer = client.get("/readyz")
        assert answer.status_code == 503
        assert "disk is full" in answer.json()["problems"]["disk"]
        # A resource bigger than what is left: the disk fills in the middle of its blob.
        answer = client.post("/fhir/Patient", content=json.dumps(_patient(99, 20_000)))
        assert answer.status_code == 507, answer.text
        outcome = answer.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert "no space left" in outcome["issue"][0]["diagnostics"]
        # Nothing of it was kept: no temporary file, no blob, no index row.
        assert sorted(p.name for p in (root / "blobs").rglob("*") if p.is_file()) == blobs_before
        # A read appends its access entry to the chain first: no room, no read (and no 404).
        got = client.get(f"/fhir/Patient/{next(iter(acked))}")
        assert got.status_code == 507, got.text

        filler.unlink()
        _until(lambda: ready() == 200, "/readyz answering 200 once space is back")
        answer = client.post("/fhir/Patient", content=json.dumps(_patient(6, 20_000)))
        assert answer.status_code == 201, answer.text
        acked[answer.json()["id"]] = answer.json()
        for rid, body in acked.items():
            assert client.get(f"/fhir/Patient/{rid}").json() == body
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = -9
    assert code == 0, log.read_text()
    assert SECRET not in log.read_text()
    done = _cli("verify", "--dir", root, "--records")
    assert done.returncode == 0, done.stderr
    assert "OK: records: 6 versions" in done.stdout


# -- damage found by verify --records ---------------------------------------------------------


def _write(root: Path, count: int, *, hold: Path | None = None) -> list[str]:
    """Write ``count`` Patients; with ``hold``, copy records.db(-wal) there before closing."""

    async def go() -> list[str]:
        node: Node = open_node(root, PASSPHRASE.encode())
        try:
            ids = [(await node.records.create(_patient(n))).id for n in range(count)]
            if hold is not None:
                for name in ("records.db", "records.db-wal"):
                    shutil.copyfile(root / name, hold / name)
            return ids
        finally:
            await node.close()

    return asyncio.run(go())


def _index(root: Path, statement: str, *args: object) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(root / "records.db")
    try:
        with conn:
            return conn.execute(statement, args).fetchall()
    finally:
        conn.close()


def _blob(root: Path, rid: str) -> Path:
    ((blob,),) = _index(root, "SELECT blob_hash FROM versions WHERE rid = ?", rid)
    assert isinstance(blob, bytes)
    return root / "blobs" / blob.hex()[:2] / blob.hex()


def test_verify_records_finds_each_kind_of_damage(tmp_path: Path) -> None:
    root = tmp_path / "node"
    _new_node(root)
    ids = _write(root, 6)
    clean = _cli("verify", "--dir", root, "--records")
    assert clean.returncode == 0, clean.stderr
    assert "OK: records: 6 versions" in clean.stdout

    flipped = _blob(root, ids[0])
    data = bytearray(flipped.read_bytes())
    data[5] ^= 0x10
    flipped.write_bytes(bytes(data))
    _blob(root, ids[1]).unlink()
    ((key,),) = _index(root, "SELECT wrapped_dek FROM versions WHERE rid = ?", ids[2])
    assert isinstance(key, bytes)
    bad_key = bytearray(key)
    bad_key[-1] ^= 0x01
    _index(root, "UPDATE versions SET wrapped_dek = ? WHERE rid = ?", bytes(bad_key), ids[2])
    _index(root, "UPDATE versions SET version = 2 WHERE rid = ?", ids[3])
    _index(root, "DELETE FROM versions WHERE rid = ?", ids[4])

    done = _cli("verify", "--dir", root, "--records")
    assert done.returncode == 3, (done.stdout, done.stderr)
    damaged = [line for line in done.stdout.splitlines() if line.startswith("DAMAGED: ")]
    text = "\n".join(damaged)
    assert len(damaged) == 5, text
    for expected in (
        "its blob does not match its hash",
        "its blob is missing",
        "its wrapped data key does not unwrap",
        "the index row and its record.put differ in version",
        "has no index row",
    ):
        assert expected in text
    (error,) = done.stderr.strip().splitlines()
    assert error.startswith("error: verification FAILED: the record store is damaged: 5 problem")
    for rid in ids:
        assert rid not in done.stdout + done.stderr
    assert SECRET not in done.stdout + done.stderr


def test_verify_records_finds_writes_lost_with_a_truncated_wal(tmp_path: Path) -> None:
    root, held = tmp_path / "node", tmp_path / "held"
    held.mkdir()
    _new_node(root)
    _write(root, 3)
    # Checkpointed at close: the WAL now starts empty for the next writes.
    _write(root, 12, hold=held)
    wal = held / "records.db-wal"
    assert wal.stat().st_size > 0
    # Crash image: records.db as it was, its WAL cut to its header (every frame lost).
    shutil.copyfile(held / "records.db", root / "records.db")
    with (root / "records.db-wal").open("wb") as out:
        out.write(wal.read_bytes()[:32])
    (root / "records.db-shm").unlink(missing_ok=True)

    done = _cli("verify", "--dir", root, "--records")
    assert done.returncode == 3, (done.stdout, done.stderr)
    lost = [line for line in done.stdout.splitlines() if "has no index row" in line]
    assert len(lost) == 12, done.stdout


def test_a_full_disk_under_the_record_index_is_storage_full(small_disk: Path) -> None:
    """SQLite's SQLITE_FULL is the same "no space" failure (507), and changes nothing."""
    path = small_disk / "records.db"
    SqliteRecordIndex.initialize(path)

    def row(n: int) -> VersionRow:
        return VersionRow(
            resource_type="Patient",
            id=f"p{n}",
            version=1,
            blob_hash=bytes(32),
            wrapped_dek=bytes(60),
            kek_id="k",
            patient=None,
            updated_ms=n,
            tx_hash=n.to_bytes(32, "big"),
        )

    async def go() -> None:
        index = SqliteRecordIndex(path)
        try:
            await index.put_version(row(0), set())
            filler = _fill(small_disk)
            tokens = {os.urandom(32) for _ in range(20_000)}  # far more than fits now
            with pytest.raises(StorageFull) as exc:
                await index.put_version(row(1), tokens)
            assert "records.db" in str(exc.value)
            assert [r.id for r in index.iter_versions()] == ["p0"]
            filler.unlink()
            await index.put_version(row(1), tokens)
            assert [r.id for r in index.iter_versions()] == ["p0", "p1"]
        finally:
            await index.close()

    asyncio.run(go())
