"""What a write can change in a node directory, for 'nothing was written' checks."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any


def blob_names(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "blobs").rglob("*") if p.is_file())


def node_state(root: Path) -> tuple[Any, ...]:
    """Chain blocks/txs, index rows and tokens, blob files: everything a write changes."""

    def rows(db: str, *queries: str) -> list[list[Any]]:
        conn = sqlite3.connect(f"file:{root / db}?mode=ro", uri=True)
        try:
            return [conn.execute(q).fetchall() for q in queries]
        finally:
            conn.close()

    chain = rows(
        "chain.db", "SELECT height, hash FROM blocks ORDER BY height", "SELECT COUNT(*) FROM txs"
    )
    index = rows(
        "records.db",
        "SELECT rtype, rid, version, blob_hash, wrapped_dek, kek_id FROM versions ORDER BY 1,2,3",
        "SELECT token, rtype, rid FROM tokens ORDER BY 1, 2, 3",
        "SELECT rtype, rid, version FROM pending_tokens ORDER BY 1, 2, 3",
    )
    return (chain, index, blob_names(root))
