"""Search tokens follow the acknowledgement (decision 0069).

A write is acknowledged once its blob, its index row and its block are
durable; its search tokens are committed right after. A search waits for the
versions pending when it started, so what a client wrote it finds; a crash
in between leaves the version pending and the next start derives its tokens
again; tokens that cannot be stored make searches fail loudly, never answer
without the write.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from medledger.core.errors import StorageError, StorageFull
from medledger.node import Node, init_node, open_node
from medledger.storage.keystore import KdfParams
from medledger.storage.ports import VersionRow
from medledger.synthetic import generate_patient

PW = b"records test passphrase"
PATIENT = generate_patient(0, seed=7, resources_per_patient=0).patient
#: Longest wait for a step another task or process takes (a failure, never a pass).
DEADLINE_S = 10.0


def _new_node(root: Path) -> Path:
    init_node(root, name="Tokens After Ack", passphrase=PW, kdf=KdfParams(n=2**12))
    return root


def _on_node(root: Path, body: Callable[[Node], Awaitable[None]]) -> None:
    async def go() -> None:
        node = open_node(root, PW)
        try:
            await body(node)
        finally:
            await node.close()

    asyncio.run(go())


def _by_family(node: Node) -> Awaitable[list[object]]:
    family = PATIENT["name"][0]["family"]
    return node.records.search("Patient", {"family": [family]})  # type: ignore[return-value]


def test_a_search_right_after_a_write_waits_for_its_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _new_node(tmp_path / "n")

    async def go(node: Node) -> None:
        release = asyncio.Event()
        settle = node.index.settle_tokens

        async def held(row: VersionRow, tokens: set[bytes]) -> None:
            await release.wait()
            await settle(row, tokens)

        monkeypatch.setattr(node.index, "settle_tokens", held)
        stored, _ = await node.records.update("Patient", PATIENT["id"], PATIENT)
        # Acknowledged: the row is durable, its tokens not yet.
        assert node.index.latest("Patient", PATIENT["id"]) is not None
        assert node.index.pending_tokens() == [("Patient", PATIENT["id"], stored.version)]
        search = asyncio.create_task(_by_family(node))
        await asyncio.sleep(0.1)
        assert not search.done(), "the search answered without the acknowledged write"
        release.set()
        found = await asyncio.wait_for(search, DEADLINE_S)
        assert [s.id for s in found] == [PATIENT["id"]]  # type: ignore[attr-defined]
        assert node.index.pending_tokens() == []

    _on_node(root, go)


CRASH_CHILD = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from pathlib import Path
    from medledger.node import open_node

    async def main(root, patient):
        node = open_node(Path(root), b"records test passphrase")

        async def never(row, tokens):
            await asyncio.Event().wait()

        node.index.settle_tokens = never
        await node.records.update("Patient", patient["id"], patient)
        print("acked", node.index.pending_tokens(), flush=True)
        os._exit(17)  # dies before the tokens are stored

    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
    """
)


def test_a_crash_before_the_tokens_are_stored_loses_no_search(tmp_path: Path) -> None:
    root = _new_node(tmp_path / "n")
    child = subprocess.run(
        [sys.executable, "-c", CRASH_CHILD, str(root), json.dumps(PATIENT)],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 17, child.stderr.decode()[-2000:]
    assert f"acked [('Patient', '{PATIENT['id']}', 1)]".encode() in child.stdout

    async def go(node: Node) -> None:
        assert node.index.pending_tokens() == [("Patient", PATIENT["id"], 1)]
        found = await _by_family(node)  # the first operation runs recovery
        assert [s.id for s in found] == [PATIENT["id"]]  # type: ignore[attr-defined]
        assert node.index.pending_tokens() == []

    _on_node(root, go)


def test_tokens_that_cannot_be_stored_fail_the_search_and_are_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _new_node(tmp_path / "n")

    async def go(node: Node) -> None:
        settle = node.index.settle_tokens
        failing = [True]

        async def flaky(row: VersionRow, tokens: set[bytes]) -> None:
            if failing[0]:
                raise StorageFull("no space left; nothing was stored")
            await settle(row, tokens)

        monkeypatch.setattr(node.index, "settle_tokens", flaky)
        await node.records.update("Patient", PATIENT["id"], PATIENT)  # acknowledged
        with pytest.raises(StorageError, match="search tokens of 1 versions"):
            await _by_family(node)
        assert node.index.pending_tokens() == [("Patient", PATIENT["id"], 1)]
        problems = node.records.health.problems(probe=False)
        assert any("writes fail for lack of space" in p for p in problems), problems
        failing[0] = False  # the disk has room again: the next search retries them
        found = await _by_family(node)
        assert [s.id for s in found] == [PATIENT["id"]]  # type: ignore[attr-defined]
        assert node.records.health.problems(probe=False) == []

    _on_node(root, go)


def test_a_search_gives_up_on_tokens_another_process_never_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version left pending by another process (a sequencer that stopped) is waited
    for a bounded time, then the search says the index is behind."""
    from medledger.services.records import service

    root = _new_node(tmp_path / "n")

    async def go(node: Node) -> None:
        await node.records.update("Patient", PATIENT["id"], PATIENT)
        await node.records.tokens_settled()
        latest = node.index.latest("Patient", PATIENT["id"])
        assert latest is not None
        # What another process's acknowledged, not yet settled, version looks like here.
        await node.index.put_version(replace(latest, id="elsewhere"), None)
        monkeypatch.setattr(service, "TOKENS_WAIT_S", 0.2)
        with pytest.raises(StorageError, match="search index is behind: 1 acknowledged"):
            await _by_family(node)
        # Reads that need no tokens still answer.
        assert (await node.records.read("Patient", PATIENT["id"])).version == 1

    _on_node(root, go)
