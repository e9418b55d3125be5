"""PostgreSQL storage on a real server: group commit, crashes, restarts, clear errors, backups.

The port contracts run on every backend in ``test_*_contract.py``.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pg_server import private_server, shared_server, unique

from medledger.config import StorageConfig
from medledger.core.errors import (
    Conflict,
    NotFound,
    RetryableStorageError,
    StorageError,
)
from medledger.core.hashing import sha256
from medledger.core.keys import SigningKey
from medledger.ledger.private import PrivateChain
from medledger.ledger.verify import verify_chain
from medledger.localnet.pg_embedded import EmbeddedPostgres
from medledger.node import init_node, open_chain, open_node, open_token_store
from medledger.storage.factory import NODE_SCHEMA_PARTS, node_schema
from medledger.storage.keystore import KdfParams
from medledger.storage.postgres.chain import PostgresChainStore
from medledger.storage.postgres.connection import schema_name
from medledger.storage.postgres.migrations import drop_schema
from medledger.storage.postgres.records import PostgresRecordIndex

CHAIN = "private:st-mary"
PW = b"pg test passphrase"
CRASH_WRITER = Path(__file__).parents[1] / "ledger" / "crash_writer.py"
MEDLEDGER = Path(sys.executable).with_name("medledger")


@pytest.fixture
def db(pg_dsn: str) -> Iterator[str]:
    """A database of its own on the session's server (dropped afterwards)."""
    server = shared_server()
    name = unique("db")
    dsn = server.create_database(name)
    yield dsn
    server.drop_database(name)


@pytest.fixture
def pg_env(db: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for a PostgreSQL node (node.toml keeps no password; the env DSN has it)."""
    env = {"MEDLEDGER_STORE": "postgres", "MEDLEDGER_DSN": db}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def pg_node(root: Path, dsn: str, name: str = "St Mary") -> Path:
    init_node(
        root,
        name=name,
        passphrase=PW,
        kdf=KdfParams(n=2**12),
        storage=StorageConfig(store="postgres", dsn=dsn),
    )
    return root


# -- group commit -----------------------------------------------------------------------


def test_group_commit_with_concurrent_writers_verifies(pg_dsn: str) -> None:
    key = SigningKey.generate()
    schema = unique("group")
    store = PostgresChainStore.create(pg_dsn, CHAIN, schema=schema)
    try:
        chain = PrivateChain.create(
            store, key, chain_id=CHAIN, institution="st-mary", name="St Mary"
        )

        async def write() -> list[Any]:
            async def writer(w: int) -> list[Any]:
                return [await chain.submit("record.put", {"w": w, "i": i}) for i in range(25)]

            try:
                return [
                    r for rs in await asyncio.gather(*(writer(w) for w in range(40))) for r in rs
                ]
            finally:
                await chain.close()

        receipts = asyncio.run(write())
        assert len({r.index for r in receipts}) == 1000
        for r in receipts[::37]:
            assert store.tx_location(r.tx_hash) == (r.height, r.index)
        report = verify_chain(store, expected_key=key.public)
        assert report.log_size == 1001
        # Group commit: far fewer blocks than transactions.
        assert report.blocks < 500
    finally:
        store.close()
        drop_schema(pg_dsn, schema)


# -- crash safety ---------------------------------------------------------------------------


def _crash_round(
    root: Path, env: dict[str, str], tag: str, delay: float
) -> list[tuple[int, bytes]]:
    proc = subprocess.Popen(
        [sys.executable, str(CRASH_WRITER), str(root), "32", tag, "50"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **env, "MEDLEDGER_PASSPHRASE": PW.decode()},
    )
    lines: list[bytes] = []
    first = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            first.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        if not first.wait(timeout=60):
            proc.kill()
            proc.wait()
            assert proc.stderr is not None
            pytest.fail(f"writer acknowledged nothing: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader.join(timeout=30)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, stderr[-2000:]
    acks = []
    for line in lines:
        if line.endswith(b"\n"):
            tx_hash, index = line.split()
            acks.append((int(index), bytes.fromhex(tx_hash.decode())))
    return acks


@pytest.mark.slow
def test_acknowledged_writes_survive_sigkill(tmp_path: Path, pg_env: dict[str, str]) -> None:
    root = pg_node(tmp_path / "node", pg_env["MEDLEDGER_DSN"])
    config, store = open_chain(root)
    store.close()
    rng = random.Random(6962)
    acked: dict[int, bytes] = {}
    sizes = []
    for round_no in range(4):
        acks = _crash_round(root, pg_env, f"r{round_no}", rng.uniform(0.1, 0.4))
        assert acks
        for index, tx_hash in acks:
            assert index not in acked, f"log index {index} acknowledged twice"
            acked[index] = tx_hash
        _, store = open_chain(root)
        try:
            for index, tx_hash in acked.items():
                assert sha256(store.tx_data(index)) == tx_hash
            report = verify_chain(store, expected_key=config.signing_key)
            blocks, txs, _ = store.counts()
            assert (blocks, txs) == (report.blocks, report.log_size)
            sizes.append(report.log_size)
        finally:
            store.close()
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)


# -- connection loss ------------------------------------------------------------------------


@pytest.fixture
def own_server() -> Iterator[EmbeddedPostgres]:
    server = private_server()
    yield server
    server.close()


def test_server_restart_while_writers_run(own_server: EmbeddedPostgres) -> None:
    """Writers see success or RetryableStorageError; no ack is lost; no reopen is needed."""
    dsn = own_server.create_database("restart")
    key = SigningKey.generate()
    store = PostgresChainStore.create(dsn, CHAIN, schema="chain", pool_timeout=0.5)
    chain = PrivateChain.create(store, key, chain_id=CHAIN, institution="st-mary", name="St Mary")
    acked: dict[int, bytes] = {}
    errors: list[Exception] = []
    after_restarts = 0

    async def run() -> None:
        nonlocal after_restarts
        done = asyncio.Event()
        restarted = asyncio.Event()

        async def writer(w: int) -> None:
            nonlocal after_restarts
            i = 0
            while not done.is_set():
                i += 1
                try:
                    r = await chain.submit("record.put", {"w": w, "i": i})
                except RetryableStorageError as exc:
                    errors.append(exc)
                    await asyncio.sleep(0.05)
                    continue
                acked[r.index] = r.tx_hash
                if restarted.is_set():
                    after_restarts += 1
                await asyncio.sleep(0.005)

        tasks = [asyncio.create_task(writer(w)) for w in range(16)]
        await asyncio.sleep(0.5)
        await asyncio.to_thread(own_server.restart, "fast", down_s=1.5)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(own_server.restart, "immediate", down_s=1.0)
        restarted.set()
        deadline = time.monotonic() + 30
        while after_restarts < 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        done.set()
        await asyncio.gather(*tasks)
        await chain.close()

    try:
        asyncio.run(run())
        assert after_restarts >= 200, "writes did not succeed again after the restarts"
        assert errors, "the server was down for seconds: some writer must have seen it"
        assert all("retry" in str(e) for e in errors)
        for index, tx_hash in acked.items():
            assert sha256(store.tx_data(index)) == tx_hash
        report = verify_chain(store, expected_key=key.public)
        assert report.log_size >= len(acked) + 1
    finally:
        store.close()


def test_reads_fail_retryably_while_down_and_recover(own_server: EmbeddedPostgres) -> None:
    dsn = own_server.create_database("reads")
    store = PostgresChainStore.create(dsn, CHAIN, schema="chain", pool_timeout=0.5)
    try:
        assert store.head() is None
        own_server.stop("immediate")
        with pytest.raises(RetryableStorageError, match="retry"):
            store.head()
        own_server.start()
        deadline = time.monotonic() + 20
        while True:
            try:
                assert store.counts() == (0, 0, 0)
                break
            except RetryableStorageError:
                assert time.monotonic() < deadline, "the pool did not recover"
                time.sleep(0.2)
    finally:
        store.close()


# -- clear errors at open --------------------------------------------------------------------


def _one_line_error(fn: Callable[[], Any], *words: str) -> str:
    with pytest.raises(StorageError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    return message


def test_bad_dsn_wrong_password_missing_database(pg_dsn: str) -> None:
    server = shared_server()
    port = server.port
    cases = {
        "garbage": ("this is not = a dsn ===", ["not a valid PostgreSQL DSN"]),
        "refused": ("host=127.0.0.1 port=1 dbname=x user=x connect_timeout=2", [":1/x", "refused"]),
        "password": (server.dsn("medledger_test", password="wrong"), ["password authentication"]),
        "database": (server.dsn("no_such_db"), ["no_such_db", "does not exist"]),
    }
    for dsn, words in cases.values():
        message = _one_line_error(lambda d=dsn: PostgresChainStore.open(d, CHAIN), *words)
        assert server.password not in message
        assert "wrong" not in message
        _one_line_error(lambda d=dsn: PostgresChainStore.create(d, CHAIN))
        _one_line_error(lambda d=dsn: PostgresRecordIndex(d, schema="x"))
    assert str(port) in _one_line_error(
        lambda: PostgresChainStore.open(server.dsn("no_such_db"), CHAIN)
    )


def test_missing_schema_is_not_found_and_newer_schema_is_refused(pg_dsn: str) -> None:
    with pytest.raises(NotFound):
        PostgresChainStore.open(pg_dsn, CHAIN, schema=unique("absent"))
    schema = unique("newer")
    PostgresChainStore.create(pg_dsn, CHAIN, schema=schema).close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO \"{schema}\".schema_migrations (version, name) VALUES (7, 'future')"
        )
    _one_line_error(
        lambda: PostgresChainStore.open(pg_dsn, CHAIN, schema=schema), "newer", "upgrade"
    )
    # Another kind of store in the schema, or another chain: refused too.
    _one_line_error(lambda: PostgresRecordIndex(pg_dsn, schema=schema))
    other = unique("other")
    PostgresChainStore.create(pg_dsn, "private:other", schema=other).close()
    _one_line_error(lambda: PostgresChainStore.open(pg_dsn, CHAIN, schema=other), "private:other")
    with pytest.raises(Conflict):
        PostgresChainStore.create(pg_dsn, CHAIN, schema=other)
    drop_schema(pg_dsn, schema)
    drop_schema(pg_dsn, other)


def test_migrations_are_recorded_and_applied_once(pg_dsn: str) -> None:
    schema = unique("mig")
    PostgresChainStore.create(pg_dsn, CHAIN, schema=schema).close()
    PostgresChainStore.open(pg_dsn, CHAIN, schema=schema).close()
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(f'SELECT version FROM "{schema}".schema_migrations').fetchall()
    assert rows == [(1,), (2,)]
    drop_schema(pg_dsn, schema)


def test_cli_reports_a_bad_dsn_in_one_line(tmp_path: Path, pg_env: dict[str, str]) -> None:
    root = pg_node(tmp_path / "node", pg_env["MEDLEDGER_DSN"])
    server = shared_server()
    env = {**os.environ, **pg_env, "MEDLEDGER_DSN": server.dsn("nope")}
    r = subprocess.run(
        [str(MEDLEDGER), "verify", "--dir", str(root)], env=env, capture_output=True, text=True
    )
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: cannot connect")
    assert "Traceback" not in r.stderr


def test_schema_names_are_safe_and_distinct() -> None:
    names = {schema_name("st-mary", "chain"), schema_name("st_mary", "chain")}
    assert len(names) == 2
    long = schema_name("x" * 63, "consortium")
    assert len(long) <= 63
    assert schema_name("abc", "chain") == "ml_abc_chain"


# -- backup and restore through the CLI --------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None) -> str:
    full = {**os.environ, "MEDLEDGER_PASSPHRASE": PW.decode(), **(env or {})}
    if env is None:
        for k in ("MEDLEDGER_STORE", "MEDLEDGER_DSN"):
            full.pop(k, None)
    r = subprocess.run([str(MEDLEDGER), *args], env=full, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _write(root: Path, n: int) -> None:
    async def go() -> None:
        node = open_node(root, PW)
        try:
            await asyncio.gather(*(node.chain.submit("record.put", {"i": i}) for i in range(n)))
        finally:
            await node.close()

    asyncio.run(go())


def test_backup_restore_round_trip_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("MEDLEDGER_STORE", "MEDLEDGER_DSN"):
        monkeypatch.delenv(k, raising=False)
    root = tmp_path / "node"
    init_node(root, name="St Jude", passphrase=PW, kdf=KdfParams(n=2**12))
    _write(root, 120)
    out = _cli("migrate", "--dir", str(root))
    assert "chain.db: SQLite schema version 1 (current)" in out
    _cli("backup", "--dir", str(root), "--out", str(tmp_path / "b.tar.gz"))
    restored = tmp_path / "restored"
    out = _cli("restore", "--dir", str(restored), "--from", str(tmp_path / "b.tar.gz"))
    assert "121 transactions" in out
    assert "OK: private:st-jude" in _cli("verify", "--dir", str(restored))
    assert (restored / "keystore.json").read_bytes() == (root / "keystore.json").read_bytes()


def test_backup_restore_round_trip_postgres(tmp_path: Path, pg_env: dict[str, str]) -> None:
    root = pg_node(tmp_path / "node", pg_env["MEDLEDGER_DSN"])
    _write(root, 120)
    # The sign-in store is backed up too: a registered app survives the restore.
    _cli("node", "oauth-client", "add", "--dir", str(root), "--name", "Kept app",
         "--client-id", "kept-app", "--redirect-uri", "https://app.example/cb", env=pg_env)  # fmt: skip
    out = _cli("migrate", "--dir", str(root), env=pg_env)
    assert "version 1 (current)" in out
    _cli("backup", "--dir", str(root), "--out", str(tmp_path / "b.tar.gz"), env=pg_env)
    server = shared_server()
    name = unique("restored")
    target = server.create_database(name)
    try:
        restored = tmp_path / "restored"
        out = _cli(
            "restore",
            "--dir",
            str(restored),
            "--from",
            str(tmp_path / "b.tar.gz"),
            "--dsn",
            target,
            env=pg_env,
        )
        assert "121 transactions" in out
        renv = {**pg_env, "MEDLEDGER_DSN": target}
        assert "OK: private:st-mary" in _cli("verify", "--dir", str(restored), env=renv)
        # The restored node accepts writes and still verifies.
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MEDLEDGER_DSN", target)
            _write(restored, 10)
        assert "131 transactions" in _cli("verify", "--dir", str(restored), env=renv)
        listed = _cli("node", "oauth-client", "list", "--dir", str(restored), env=renv)
        assert "kept-app" in listed
        # Restoring over existing schemas is refused, leaving nothing behind.
        again = tmp_path / "again"
        r = subprocess.run(
            [
                str(MEDLEDGER),
                "restore",
                "--dir",
                str(again),
                "--from",
                str(tmp_path / "b.tar.gz"),
                "--dsn",
                target,
            ],
            env={**os.environ, **renv},
            capture_output=True,
            text=True,
        )
        assert r.returncode == 1 and "already holds" in r.stderr
        assert not again.exists()
    finally:
        server.drop_database(name)


def test_node_with_postgres_blobs_and_index(tmp_path: Path, pg_env: dict[str, str]) -> None:
    """A whole node on PostgreSQL (chain, index, blobs) opens, writes, closes and verifies."""
    dsn = pg_env["MEDLEDGER_DSN"]
    root = tmp_path / "node"
    init_node(
        root,
        name="One System",
        passphrase=PW,
        kdf=KdfParams(n=2**12),
        storage=StorageConfig(store="postgres", dsn=dsn, blobs="postgres"),
    )
    assert "password" not in (root / "node.toml").read_text()
    assert not (root / "chain.db").exists() and not (root / "blobs").exists()
    _write(root, 20)
    config, store = open_chain(root)
    try:
        assert verify_chain(store, expected_key=config.signing_key).log_size == 21
    finally:
        store.close()
    with psycopg.connect(dsn) as conn:
        schemas = {
            r[0] for r in conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'ml_%'")
        }
    assert {node_schema("one-system", p) for p in NODE_SCHEMA_PARTS} - schemas == {
        node_schema("one-system", "consortium")  # created when the node joins a consortium
    }
    # API tokens and peer nonces live in PostgreSQL too: no SQLite file beside the config.
    tokens = open_token_store(root)
    try:
        text, _ = tokens.create(role="clinician", now_ms=1_700_000_000_000)
    finally:
        tokens.close()
    tokens = open_token_store(root)
    try:
        assert tokens.check(text, now_ms=1_700_000_000_001).role == "clinician"
    finally:
        tokens.close()
    assert not list(root.glob("*tokens*")) and not list(root.glob("*nonces*"))
