"""The solo orderer shared by several processes through one SQLite order file.

Two publisher processes (``solo_publisher.py``) publish at the same time —
distinct messages and messages under the same ids — while this process
follows the order with a reader of its own. Everyone must see one order:
sequences 1..n without gaps, every message exactly once, each shared id
stored once with one sequence that both publishers were told, times that
never go back.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from medledger.ledger.ordering.port import OrderedMessage
from medledger.ledger.ordering.solo import SoloOrderer

PUBLISHER = Path(__file__).with_name("solo_publisher.py")
COUNT = 150
SHARED = 40
TOTAL = 2 * COUNT + SHARED


def test_two_processes_publish_into_one_order_and_read_it_alike(tmp_path: Path) -> None:
    path = tmp_path / "order.db"
    outs = [tmp_path / "a.json", tmp_path / "b.json"]

    async def main() -> list[OrderedMessage]:
        # This process follows the order from the start, before anything is in it:
        # it can only learn of the other processes' messages by polling the file.
        order = SoloOrderer(path)
        procs = []
        try:
            env = {**os.environ, "SOLO_TOTAL": str(TOTAL)}
            for tag, out in zip(("a", "b"), outs, strict=True):
                procs.append(
                    subprocess.Popen(
                        [sys.executable, PUBLISHER, path, tag, str(COUNT), str(SHARED), out],
                        env=env,
                        stdin=subprocess.DEVNULL,
                    )
                )
            seen: list[OrderedMessage] = []
            async with asyncio.timeout(120):
                async for message in order.read(1):
                    seen.append(message)
                    if len(seen) == TOTAL:
                        break
            codes = [await asyncio.to_thread(p.wait, 120) for p in procs]
            assert codes == [0, 0]
            assert await order.last_seq() == TOTAL
            return seen
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            await order.close()

    followed = asyncio.run(main())
    order = [[m.seq, m.payload.decode(), m.time_ms] for m in followed]
    assert [row[0] for row in order] == list(range(1, TOTAL + 1))
    payloads = [row[1] for row in order]
    expected = {f"{t}-{i}" for t in "ab" for i in range(COUNT)} | {
        f"shared-{j}" for j in range(SHARED)
    }
    assert len(payloads) == len(set(payloads)) and set(payloads) == expected
    times = [row[2] for row in order]
    assert times == sorted(times), "the order's clock went back"
    at = {payload: seq for seq, payload, _ in order}
    results = [json.loads(out.read_text()) for out in outs]
    for result in results:
        assert result["order"] == order, "a publisher process read a different order"
        for msg_id, seq in result["acks"].items():
            assert at[msg_id] == seq, f"{msg_id} was acknowledged at {seq}, stored at {at[msg_id]}"
    # Both processes published every shared id; each was stored once, under one seq.
    for j in range(SHARED):
        assert results[0]["acks"][f"shared-{j}"] == results[1]["acks"][f"shared-{j}"]
