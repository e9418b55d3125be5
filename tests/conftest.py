"""Shared fixtures: a deterministic clock and a node factory with a fast KDF.

The default keystore KDF (scrypt n=2**15) costs ~0.1 s per unlock; tests use
n=2**12, which exercises the same code in a few milliseconds.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from bytecode_cache import enable_for_children
from medledger.config import NodeConfig
from medledger.ledger.private import SequencerConfig
from medledger.node import init_node
from medledger.storage.keystore import KdfParams
from module_scheduling import ModuleScheduling

# Hypothesis's per-example deadline (200 ms) is a timing assertion: on a loaded
# machine it failed examples that were correct. Speed is measured by benchmarks.
settings.register_profile("medledger", deadline=None)
settings.load_profile("medledger")

#: Passphrase of every node made by ``make_node``.
PASSPHRASE = b"correct horse battery staple"
FAST_KDF = KdfParams(n=2**12)


#: A default object repr in a test id (``<X object at 0x7f...>``): it changes from run to run.
_ADDRESS_IN_ID = re.compile(r" at 0x[0-9a-fA-F]+")


def pytest_configure(config: pytest.Config) -> None:
    """Child processes (xdist workers, nodes, CLI runs) share one bytecode cache.

    Only when bytecode writing is turned off: then each would compile every module
    it imports again (see :mod:`bytecode_cache`).
    """
    enable_for_children(os.environ)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse test ids that differ between runs.

    pytest-xdist workers refuse to start unless all collect the same ids; an id
    holding a memory address never matches.
    """
    unstable = [item.nodeid for item in items if _ADDRESS_IN_ID.search(item.nodeid)]
    if unstable:
        raise pytest.UsageError(
            "test ids must be the same on every run (give the value a repr or the "
            f"parameter an id): {unstable[:3]}"
        )


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook; `-p no:xdist` runs stay valid
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """Under ``-n N --dist loadfile``: whole modules per worker, the slowest first.

    See :mod:`module_scheduling` (``make test`` runs ``-n 2 --dist loadfile``).
    """
    if config.getoption("dist", default=None) != "loadfile":
        return None
    return ModuleScheduling(config, log)


class StepClock:
    """A clock that starts at ``start`` ms and advances ``step`` ms on every reading."""

    def __init__(self, start: int = 1_700_000_000_000, step: int = 1) -> None:
        self._now = start
        self._step = step

    def now_ms(self) -> int:
        now = self._now
        self._now += self._step
        return now


@pytest.fixture
def clock() -> StepClock:
    return StepClock()


@pytest.fixture
def passphrase() -> bytes:
    return PASSPHRASE


MakeNode = Callable[..., tuple[Path, NodeConfig]]


@pytest.fixture
def make_node(tmp_path: Path, clock: StepClock) -> MakeNode:
    """Factory: ``make_node(name="St. Mary", sequencer=None) -> (root, config)``.

    Each call creates a fresh node directory under ``tmp_path`` with a fast
    KDF, the fixed-step ``clock`` for its genesis block, and ``PASSPHRASE``.
    """
    counter = iter(range(1_000_000))

    def make(
        name: str = "St. Mary Hospital", sequencer: SequencerConfig | None = None
    ) -> tuple[Path, NodeConfig]:
        root = tmp_path / f"node-{next(counter)}"
        config = init_node(
            root, name=name, passphrase=PASSPHRASE, sequencer=sequencer, kdf=FAST_KDF, clock=clock
        )
        return root, config

    return make


@pytest.fixture
def network_dir(tmp_path: Path) -> Iterator[Path]:
    """A ``medledger network`` directory; whatever runs from it is stopped afterwards."""
    from network_support import stop_network

    base = tmp_path / "net"
    try:
        yield base
    finally:
        stop_network(base)
