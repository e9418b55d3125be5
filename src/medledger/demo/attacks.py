"""What an attacker does to a stopped node's stored chain, and ``medledger verify`` catching it.

Each attack works on a copy of the node directory, so the real node is never
harmed: an edit of one stored transaction (someone with write access to the
database file), and a complete rewrite of the history re-signed with the
institution's own key (an insider with the keystore) — internally perfect,
caught only against the consortium's final anchors.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from medledger.config import NodePaths
from medledger.ledger.private import PrivateChain
from medledger.node import open_chain
from medledger.storage.keystore import FileKeyStore
from medledger.storage.sqlite.chain import SqliteChainStore

__all__ = ["Verdict", "edit_one_transaction", "rewrite_history", "run_verify"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What ``medledger verify`` said: its command line, exit status and key line."""

    command: str
    code: int
    message: str


def _medledger() -> list[str]:
    script = Path(sys.executable).parent / "medledger"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from medledger.cli import main; main()"]


def run_verify(node_dir: Path, *, consortium: bool, shown_as: str) -> Verdict:
    """Run the real ``medledger verify`` on ``node_dir``, as a user would."""
    args = ["verify", "--dir", str(node_dir), *(["--consortium"] if consortium else [])]
    proc = subprocess.run(
        [*_medledger(), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = (proc.stderr if proc.returncode else proc.stdout).strip().splitlines()
    message = lines[0] if proc.returncode else " · ".join(line.strip() for line in lines)
    shown = ["medledger", "verify", "--dir", shown_as, *(["--consortium"] if consortium else [])]
    return Verdict(command=" ".join(shown), code=proc.returncode, message=message)


def edit_one_transaction(node_dir: Path) -> str:
    """Change one byte of a stored ``record.put`` (its ciphertext hash); says which entry."""
    conn = sqlite3.connect(NodePaths(root=node_dir).chain_db, isolation_level=None)
    try:
        rows = conn.execute("SELECT idx, data FROM txs ORDER BY idx").fetchall()
        puts = [(i, bytes(d)) for i, d in rows if json.loads(d)["type"] == "record.put"]
        idx, data = puts[len(puts) // 2]
        blob = json.loads(data)["body"]["blob"]
        forged = blob[:-1] + ("0" if blob[-1] != "0" else "1")
        conn.execute(
            "UPDATE txs SET data = ? WHERE idx = ?",
            (data.replace(blob.encode(), forged.encode()), idx),
        )
    finally:
        conn.close()
    return f"entry {idx}: record.put with blob …{blob[-6:]} → …{forged[-6:]}"


class _FixedClock:
    def __init__(self, ms: int) -> None:
        self._ms = ms

    def now_ms(self) -> int:
        return self._ms


def rewrite_history(node_dir: Path, passphrase: bytes) -> str:
    """Rebuild the whole private chain with one record changed, signed with the node's key."""
    return asyncio.run(_rewrite(node_dir, passphrase))


async def _rewrite(node_dir: Path, passphrase: bytes) -> str:
    paths = NodePaths(root=node_dir)
    key = FileKeyStore.open(paths.keystore, passphrase).signing_key()
    _, old = open_chain(node_dir)
    try:
        first = json.loads(old.block(0).tx_data[0])
        genesis, genesis_time = first["body"], first["time_ms"]
        txs = [json.loads(old.tx_data(i)) for i in range(1, old.counts()[1])]
    finally:
        old.close()
    target = next(i for i, tx in enumerate(txs) if tx["type"] == "record.put")
    txs[target]["body"]["version"] += 6  # the record the insider wanted to change
    fresh = paths.chain_db.with_suffix(".new")
    store = SqliteChainStore.create(fresh, f"private:{genesis['institution']}")
    # The same genesis transaction and time as the original: a careful forger.
    chain = PrivateChain.create(
        store,
        key,
        chain_id=store.chain,
        institution=genesis["institution"],
        name=genesis["name"],
        clock=_FixedClock(genesis_time),
    )
    # Tasks start in creation order, so the log keeps its order while blocks batch.
    await asyncio.gather(*(chain.submit(tx["type"], tx["body"]) for tx in txs))
    await chain.close()
    store.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(paths.chain_db) + suffix).unlink(missing_ok=True)
    fresh.rename(paths.chain_db)
    return f"{len(txs) + 1} entries re-written and re-signed; entry {target + 1} changed"
