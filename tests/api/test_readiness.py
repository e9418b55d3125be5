"""``/readyz`` tells the truth: a node whose chain file SQLite finds corrupt is not ready.

(It used to answer 200 while every read of the chain failed with "database disk
image is malformed".)
"""

from __future__ import annotations

import sqlite3
import time

import httpx
from api_helpers import LiveServer


def test_readyz_turns_503_once_the_chain_file_is_corrupt(
    live: LiveServer, clinician: httpx.Client
) -> None:
    ready = httpx.get(f"{live.url}/readyz", timeout=10)
    assert ready.status_code == 200
    # A fresh node's (empty) index is made with this release's search terms.
    deadline = time.monotonic() + 30
    while ready.json()["search_index"] != "current":
        assert time.monotonic() < deadline, ready.json()
        time.sleep(0.05)
        ready = httpx.get(f"{live.url}/readyz", timeout=10)
    created = clinician.post(
        "/fhir/Patient",
        json={"resourceType": "Patient", "gender": "other"},
        headers={"Content-Type": "application/fhir+json"},
    )
    assert created.status_code == 201, created.text
    path = live.root / "chain.db"
    conn = sqlite3.connect(path)
    try:  # every block into the main file, so the file is what the node reads next
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    finally:
        conn.close()
    with path.open("r+b") as f:
        for page in range(1, pages):
            f.seek(page * page_size)
            f.write(b"\xa5" * page_size)
    deadline = time.monotonic() + 30
    while True:
        ready = httpx.get(f"{live.url}/readyz", timeout=10)
        if ready.status_code == 503:
            break
        assert time.monotonic() < deadline, ready.text
        time.sleep(0.05)
    body = ready.json()
    assert body["status"] == "unhealthy" and "private-chain-store" in body["problems"], body
    assert str(live.root) not in ready.text  # an unauthenticated endpoint names no paths
