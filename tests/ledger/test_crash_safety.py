"""Crash safety of the private chain: an ack means durable, a crash leaves whole blocks.

A child process (``crash_writer.py``) opens a node and appends from 64
concurrent writers, printing each acknowledged transaction. The test kills it
with SIGKILL at a random moment, then reopens the chain (reading only) and checks:
every acknowledged transaction is at its index with its hash, the chain
verifies (and stays consistent with the heads seen after earlier crashes), and
the head accounts for every stored transaction (nothing half-written). Then it
starts the writer again on the same node. The kill moments come from a fixed
``random.Random(SEED)``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from medledger.core.hashing import sha256
from medledger.ledger.proofs import head_header
from medledger.ledger.verify import Checkpoint, verify_chain
from medledger.node import open_chain

WRITER = Path(__file__).with_name("crash_writer.py")
SEED = 20181210
ROUNDS = 20
WRITERS = 64
# Each writer pauses up to this long between submits: keeps the chain, and so
# the full verification after every crash, small.
PAUSE_MS = 150


class Run:
    """One life of the writer process, from start to SIGKILL."""

    def __init__(self, root: Path, passphrase: bytes, tag: str) -> None:
        env = {**os.environ, "MEDLEDGER_PASSPHRASE": passphrase.decode()}
        self.proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(root), str(WRITERS), tag, str(PAUSE_MS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.lines: list[bytes] = []
        self.first_ack = threading.Event()
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self.first_ack.set()

    def kill_after_first_ack(self, delay: float) -> list[tuple[int, bytes]]:
        """Wait for the first ack, let it run ``delay`` seconds more, SIGKILL it; the acks."""
        try:
            if not self.first_ack.wait(timeout=60):
                self.proc.kill()
                self.proc.wait()
                assert self.proc.stderr is not None
                pytest.fail(f"writer printed no ack: {self.proc.stderr.read().decode()[-2000:]}")
            time.sleep(delay)  # the random kill moment; nothing is timed
        finally:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self._pump.join(timeout=30)
            assert self.proc.stdout is not None and self.proc.stderr is not None
            self.proc.stdout.close()
            stderr = self.proc.stderr.read().decode()
            self.proc.stderr.close()
        # -SIGKILL: it was still writing when killed, not dead of its own error.
        assert self.proc.returncode == -signal.SIGKILL, stderr[-2000:]
        acks = []
        for line in self.lines:
            if not line.endswith(b"\n"):
                continue  # cut off mid-line by the kill: not a complete promise
            tx_hash, index = line.split()
            acks.append((int(index), bytes.fromhex(tx_hash.decode())))
        return acks


@pytest.mark.slow
def test_acknowledged_writes_survive_sigkill(make_node: Any, passphrase: bytes) -> None:
    root, config = make_node()
    rng = random.Random(SEED)
    acked: dict[int, bytes] = {}
    published: list[Checkpoint] = []
    sizes: list[int] = []

    for round_no in range(ROUNDS):
        acks = Run(root, passphrase, f"round-{round_no}").kill_after_first_ack(
            rng.uniform(0.05, 0.6)
        )
        assert acks, "the writer acknowledged something before it was killed"
        for index, tx_hash in acks:
            assert index not in acked, f"log index {index} was acknowledged twice"
            acked[index] = tx_hash

        _, store = open_chain(root)
        try:
            # Every acknowledged transaction is durable, where and what it was said to be.
            for index, tx_hash in acks:
                assert sha256(store.tx_data(index)) == tx_hash
            # The chain verifies and never contradicts a head seen after an earlier crash.
            report = verify_chain(store, expected_key=config.signing_key, checkpoints=published)
            head = head_header(store)
            blocks, txs, _ = store.counts()
            # Nothing half-written: the head accounts for every stored block and transaction.
            assert (blocks, txs) == (head.height + 1, head.log_size)
            assert report.log_size == head.log_size
            assert report.log_root == head.log_root
            assert max(index for index, _ in acks) < head.log_size
            published.append(Checkpoint(size=report.log_size, root=report.log_root))
            sizes.append(report.log_size)
        finally:
            store.close()

    # Each restart continued the same chain: it only grew.
    assert sizes == sorted(sizes)
    assert len(set(sizes)) == ROUNDS
    _, store = open_chain(root)
    try:
        for index, tx_hash in acked.items():
            assert sha256(store.tx_data(index)) == tx_hash
            assert store.tx_location(tx_hash)[1] == index
    finally:
        store.close()
