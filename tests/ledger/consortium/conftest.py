"""Fixtures for consortium tests: networks of in-process members on one SoloOrderer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from consortium_net import FAST, MakeNetwork, Network

from medledger.core.consortium import ConsortiumParams


@pytest.fixture
def network(tmp_path: Path) -> Iterator[MakeNetwork]:
    """Factory: ``network(n=4, params=FAST) -> Network`` (stores closed at teardown).

    Members, private chains and anchorers are created inside ``Network.run``'s
    event loop; each network gets its own sub-directory of ``tmp_path``.
    """
    made: list[Network] = []

    def make(n: int = 4, params: ConsortiumParams = FAST) -> Network:
        directory = tmp_path / f"net-{len(made)}"
        directory.mkdir()
        net = Network(directory, n, params)
        made.append(net)
        return net

    yield make
    for net in made:
        net.close_stores()
