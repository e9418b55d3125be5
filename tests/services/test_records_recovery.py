"""A crash between a write's index commit and its chain commit leaves nothing behind.

A child process writes version 1 of a Patient (acknowledged), then dies
(``os._exit``) inside the chain commit of version 2 — after version 2's
index row, search tokens and blob were made durable. The reopened node must
answer as if version 2 never happened: it was never acknowledged.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

from node_files import blob_names

from medledger.ledger.verify import verify_chain
from medledger.node import init_node, open_chain, open_node
from medledger.services.synthetic import generate_patient
from medledger.storage.keystore import KdfParams

PW = b"records test passphrase"
PATIENT = generate_patient(0, seed=5, resources_per_patient=0).patient

CHILD = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from pathlib import Path
    from medledger.node import open_node

    async def main(root, patient):
        node = open_node(Path(root), b"records test passphrase")
        await node.records.update("Patient", patient["id"], patient)
        print("acked v1", flush=True)

        async def crash(txs):
            os._exit(17)  # the process dies before the block is written

        node.records._chain.submit_many = crash
        changed = dict(patient, gender="other" if patient.get("gender") != "other" else "male")
        await node.records.update("Patient", patient["id"], changed)

    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
    """
)


def test_an_unacknowledged_version_is_taken_back_after_a_crash(tmp_path: Path) -> None:
    import json

    root = tmp_path / "node"
    init_node(root, name="Crash Test", passphrase=PW, kdf=KdfParams(n=2**12))
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), json.dumps(PATIENT)],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 17, child.stderr.decode()
    assert b"acked v1" in child.stdout
    blobs_after_crash = blob_names(root)
    assert len(blobs_after_crash) == 2  # v2's blob was durable before the crash

    async def reopen() -> None:
        node = open_node(root, PW)
        try:
            assert [r.version for r in node.index.history("Patient", PATIENT["id"])] == [2, 1]
            stored = await node.records.read("Patient", PATIENT["id"])
            assert stored.version == 1
            assert stored.resource()["gender"] == PATIENT["gender"]
            assert [v.version for v in await node.records.history("Patient", PATIENT["id"])] == [1]
            # Search answers from version 1's tokens again.
            found = await node.records.search("Patient", {"gender": [PATIENT["gender"]]})
            assert [s.id for s in found] == [PATIENT["id"]]
            assert await node.records.recover() == 0  # nothing left to take back
            # The next write is version 2 again, and it commits.
            written, _ = await node.records.update(
                "Patient", PATIENT["id"], dict(PATIENT, gender="unknown")
            )
            assert written.version == 2
        finally:
            await node.close()

    asyncio.run(reopen())
    assert len(blob_names(root)) == 2  # the orphan blob went, the new v2 blob came
    assert blob_names(root) != blobs_after_crash
    config, store = open_chain(root)
    try:
        verify_chain(store, expected_key=config.signing_key)
    finally:
        store.close()
