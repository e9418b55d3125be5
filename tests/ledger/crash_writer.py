"""Crash-test writer, run as a script by ``test_crash_safety.py`` (not a test module).

Usage: ``python crash_writer.py NODE_DIR WRITERS TAG PAUSE_MS`` with the
keystore passphrase in ``MEDLEDGER_PASSPHRASE``. Opens the node and runs
``WRITERS`` concurrent asyncio writers that append transactions forever; after
each acknowledged submit it prints ``<tx hash hex> <log index>`` and flushes,
so every line the parent reads is a promise that the transaction is durable.
Each writer pauses a random 0..PAUSE_MS between submits, which keeps the chain
(and so the test's full verification after every crash) small while commits
still overlap. It never exits on its own: the test kills it with SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
from pathlib import Path
from typing import TextIO

from medledger.node import Node, open_node


async def _writer(node: Node, writer: int, tag: str, pause_ms: float, out: TextIO) -> None:
    rng = random.Random(f"{tag}-{writer}")
    seq = 0
    while True:
        await asyncio.sleep(rng.uniform(0, pause_ms) / 1000)
        body = {"tag": tag, "writer": writer, "seq": seq}
        receipt = await node.chain.submit("record.put", body)
        out.write(f"{receipt.tx_hash.hex()} {receipt.index}\n")
        out.flush()
        seq += 1


async def _main(root: Path, writers: int, tag: str, pause_ms: float) -> None:
    node = open_node(root, os.environ["MEDLEDGER_PASSPHRASE"].encode())
    await asyncio.gather(*(_writer(node, w, tag, pause_ms, sys.stdout) for w in range(writers)))


if __name__ == "__main__":
    asyncio.run(_main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])))
