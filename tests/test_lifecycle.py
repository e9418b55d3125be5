"""``run_node``: a node opened in order, its readiness, and everything closed on the way out.

Real stores, a real solo order file, and a real nats-server: a start that fails
after the node connected to NATS must leave no connection and no open file.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from medledger.config import ConsortiumConfig, NodePaths, load_config
from medledger.core.consortium import ConsortiumParams
from medledger.core.errors import StorageError, VerificationError
from medledger.heap import YOUNG_THRESHOLD
from medledger.lifecycle import ANCHOR_CHECK, RunSettings, run_node
from medledger.localnet.natsserver import NatsCluster
from medledger.node import init_node, write_genesis
from medledger.storage.keystore import KdfParams

PASSPHRASE = b"lifecycle test passphrase"
DEADLINE_S = 20.0


def _make_node(root: Path, consortium: ConsortiumConfig) -> None:
    init_node(root, name="Lifecycle Hospital", passphrase=PASSPHRASE, kdf=KdfParams(n=2**12))
    replace(load_config(root, env={}), consortium=consortium).save(NodePaths(root=root).config)


def _open_files_under(*dirs: Path) -> list[str]:
    """What this process holds open inside ``dirs`` (databases, WAL files, order files)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed since listed
            continue
        if any(target.startswith(f"{d}/") for d in dirs):
            held.append(target)
    return held


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def test_a_start_that_fails_after_connecting_to_nats_closes_the_connection_and_the_stores(
    tmp_path: Path,
) -> None:
    root = tmp_path / "node"
    order = tmp_path / "order"
    order.mkdir()
    _make_node(root, ConsortiumConfig(ordering="solo", order_file=str(order / "order.db")))
    write_genesis("lifecycle", [root], time_ms=1_700_000_000_000)

    async def join_once() -> None:
        async with run_node(root, PASSPHRASE):
            pass

    asyncio.run(join_once())  # the node's copy of the consortium chain starts at this genesis
    with NatsCluster(tmp_path / "nats", size=1) as cluster:
        monitor = cluster.nodes[0].monitor_url
        config = ConsortiumConfig(
            ordering="jetstream",
            nats_urls=tuple(cluster.client_urls()),
            stream="LIFECYCLE",
            replicas=1,
        )
        replace(load_config(root, env={}), consortium=config).save(NodePaths(root=root).config)
        # Another genesis of the same consortium: found out when joining, which is
        # after the ordering connection is made and the consortium store is opened.
        write_genesis("lifecycle", [root], time_ms=1_700_000_000_001)

        async def start() -> None:
            async with run_node(root, PASSPHRASE, RunSettings(scrub_interval_s=60)):
                raise AssertionError("a node with another genesis must not start")

        with pytest.raises(VerificationError, match="different genesis block"):
            asyncio.run(start())

        # The node had connected, and left no connection behind.
        assert httpx.get(f"{monitor}/varz", timeout=5).json()["total_connections"] >= 1
        _until(
            lambda: httpx.get(f"{monitor}/varz", timeout=5).json()["connections"] == 0,
            "the node's NATS connection is closed",
        )
        assert _open_files_under(root) == []


def test_readiness_waits_for_the_anchor_check_and_turns_false_once_stopping(
    tmp_path: Path,
) -> None:
    root = tmp_path / "node"
    order = tmp_path / "order"
    order.mkdir()
    _make_node(root, ConsortiumConfig(ordering="solo", order_file=str(order / "order.db")))
    write_genesis(
        "lifecycle", [root], time_ms=1_700_000_000_000, params=ConsortiumParams(cut_after_ms=5)
    )

    async def run() -> list[str | None]:
        seen: list[str | None] = []
        async with run_node(root, PASSPHRASE) as runtime:
            assert runtime.ordering is not None and runtime.node.anchorer is not None
            # Nothing has run yet: the chain has not been checked against the stream.
            seen.append(runtime.not_ready())
            deadline = asyncio.get_running_loop().time() + DEADLINE_S
            while runtime.not_ready() is not None:
                assert asyncio.get_running_loop().time() < deadline, runtime.not_ready()
                await asyncio.sleep(0.02)
            seen.append(runtime.not_ready())
            stopped: list[bool] = []
            runtime.on_stop(lambda: stopped.append(runtime.not_ready() == "stopping"))
            runtime.stop()
            runtime.stop()  # once only
            seen.append(runtime.not_ready())
            assert stopped == [True], "readiness is false before the server is asked to exit"
            assert not runtime.ready()
        return seen

    assert asyncio.run(run()) == ["catching up", None, "stopping"]
    assert _open_files_under(root, order) == []


def test_an_anchor_check_that_cannot_run_keeps_the_node_unready_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "node"
    order = tmp_path / "order"
    order.mkdir()
    _make_node(root, ConsortiumConfig(ordering="solo", order_file=str(order / "order.db")))
    write_genesis(
        "lifecycle", [root], time_ms=1_700_000_000_000, params=ConsortiumParams(cut_after_ms=5)
    )
    institution = load_config(root, env={}).institution

    async def until(condition: Callable[[], bool], what: str) -> None:
        deadline = asyncio.get_running_loop().time() + DEADLINE_S
        while not condition():
            assert asyncio.get_running_loop().time() < deadline, f"timed out: {what}"
            await asyncio.sleep(0.02)

    async def write_and_anchor() -> None:
        async with run_node(root, PASSPHRASE) as runtime:
            await runtime.node.records.create({"resourceType": "Patient", "active": True})
            member = runtime.node.consortium
            assert member is not None
            await until(lambda: institution in member.state.anchors, "the write is anchored")

    asyncio.run(write_and_anchor())

    def unreadable(*_args: object) -> None:
        raise StorageError(f"{root}/chain.db: disk I/O error")

    # The store fails under the check after the restart (an I/O error, not damage).
    monkeypatch.setattr("medledger.lifecycle.check_against_anchor", unreadable)

    async def restart() -> str:
        async with run_node(root, PASSPHRASE) as runtime:
            health = runtime.node.health
            await until(lambda: ANCHOR_CHECK in health.problems(), "the failed check shows")
            assert runtime.not_ready() == "catching up"
            assert runtime.refused is None  # not proven damaged: nothing refused for good
            return health.problems()[ANCHOR_CHECK]

    problem = asyncio.run(restart())
    assert "StorageError" in problem and "restart the node" in problem
    assert str(root) not in problem  # unauthenticated /readyz shows it: no paths


def test_a_started_node_has_frozen_its_start_up_heap(tmp_path: Path) -> None:
    """Once open and before serving, start-up's objects are out of the collector's reach
    (medledger.heap): a full collection no longer rescans them under load."""
    root = tmp_path / "node"
    order = tmp_path / "order"
    order.mkdir()
    _make_node(root, ConsortiumConfig(ordering="solo", order_file=str(order / "order.db")))
    write_genesis("lifecycle", [root], time_ms=1_700_000_000_000)
    gc.unfreeze()
    thresholds = gc.get_threshold()
    gc.set_threshold(700, *thresholds[1:])  # CPython's default, whatever ran before

    async def started() -> tuple[int, bool, int]:
        async with run_node(root, PASSPHRASE) as runtime:
            node = runtime.node
            return (
                gc.get_freeze_count(),
                any(o is node.records for o in gc.get_objects()),
                gc.get_threshold()[0],
            )

    try:
        frozen, records_tracked, young = asyncio.run(started())
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
    assert frozen > 0
    assert not records_tracked, "the node's records service is still scanned by the collector"
    # ...and reads waiting for their access entry's block do not set off young collections.
    assert young == YOUNG_THRESHOLD
