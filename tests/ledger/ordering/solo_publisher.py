"""Publisher process for ``test_solo_processes.py`` (a script, not a test module).

Usage: ``python solo_publisher.py ORDER_DB TAG COUNT SHARED OUT``. Opens the
solo order file, publishes ``COUNT`` messages ``TAG-i`` from 8 concurrent
tasks plus ``SHARED`` messages under ids every publisher process uses
(``shared-j``, payload ``shared-j``), then reads the whole order back until
it has ``TOTAL`` (env ``SOLO_TOTAL``) messages and writes JSON to OUT:
``{"acks": {msg_id: seq}, "order": [[seq, payload, time_ms], ...]}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from medledger.ledger.ordering.solo import SoloOrderer


async def main(path: Path, tag: str, count: int, shared: int, out: Path) -> None:
    total = int(os.environ["SOLO_TOTAL"])
    order = SoloOrderer(path)
    acks: dict[str, int] = {}
    ids = [f"{tag}-{i}" for i in range(count)] + [f"shared-{j}" for j in range(shared)]

    async def publisher(worker: int) -> None:
        for msg_id in ids[worker::8]:
            payload = msg_id.encode()
            acks[msg_id] = await order.publish(msg_id, payload)

    try:
        await asyncio.gather(*(publisher(w) for w in range(8)))
        seen = []
        async with asyncio.timeout(120):
            async for message in order.read(1):
                seen.append([message.seq, message.payload.decode(), message.time_ms])
                if len(seen) == total:
                    break
    finally:
        await order.close()
    out.write_text(json.dumps({"acks": acks, "order": seen}))


if __name__ == "__main__":
    db, tag, count, shared, out = sys.argv[1:6]
    asyncio.run(main(Path(db), tag, int(count), int(shared), Path(out)))
