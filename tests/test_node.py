"""The composition root hands the node one clock, which the API reads "now" from."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from medledger.config import NodeConfig
from medledger.ledger.clock import Clock, SystemClock
from medledger.node import open_node

MakeNode = Callable[..., tuple[Path, NodeConfig]]


def test_open_node_keeps_the_injected_clock(
    make_node: MakeNode, clock: Clock, passphrase: bytes
) -> None:
    root, _ = make_node()
    node = open_node(root, passphrase, clock=clock)
    try:
        assert node.clock is clock
        before = clock.now_ms()
        assert node.clock.now_ms() == before + 1
    finally:
        asyncio.run(node.close())


def test_open_node_defaults_to_the_system_clock(make_node: MakeNode, passphrase: bytes) -> None:
    root, _ = make_node()
    node = open_node(root, passphrase)
    try:
        assert isinstance(node.clock, SystemClock)
    finally:
        asyncio.run(node.close())
