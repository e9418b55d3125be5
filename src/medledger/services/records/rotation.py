"""KEK rotation: a new KEK re-wraps every data key, ``key.rotate`` on the chain, the old one destroyed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from medledger.core.envelope import unwrap_key, wrap_key
from medledger.core.errors import IntegrityError
from medledger.core.transactions import KEY_ROTATE
from medledger.services.keys import InstitutionKeys
from medledger.services.records.model import RecordChain
from medledger.services.records.writes import RecordWriter
from medledger.storage.ports import RecordIndex, VersionRow

__all__ = ["rotate_kek"]


async def rotate_kek(
    *,
    chain: RecordChain,
    index: RecordIndex,
    keys: InstitutionKeys,
    writer: RecordWriter,
    random_bytes: Callable[[int], bytes],
) -> dict[str, Any]:
    """New KEK; re-wrap every data key; ``key.rotate`` on the chain; destroy the old KEK.

    The old KEK is kept (and :class:`IntegrityError` raised) if any data key is
    still wrapped by it after the sweep.
    """
    old_id, old = keys.current_kek()
    new_id = keys.add_current_kek()
    new = keys.kek(new_id)
    # Writes that picked the old KEK before the switch must land before the sweep.
    while writer.inflight[old_id]:
        await asyncio.sleep(0.001)

    def rewrap(row: VersionRow) -> bytes:
        assert row.wrapped_dek is not None
        dek = unwrap_key(old, row.wrapped_dek, row.blob_hash)
        return wrap_key(new, random_bytes(12), dek, row.blob_hash)

    count = await index.rewrap(old_id, new_id, rewrap)
    if index.count_wrapped_by(old_id):
        raise IntegrityError("data keys still wrapped by the old KEK; it was kept")
    await chain.submit(
        KEY_ROTATE, {"purpose": "kek", "old": old_id, "new": new_id, "rewrapped": count}
    )
    keys.destroy_kek(old_id)
    return {"old": old_id, "new": new_id, "rewrapped": count}
