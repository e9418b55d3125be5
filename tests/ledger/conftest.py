"""Fixtures for ledger tests: private chains on fresh SQLite files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from chain_helpers import Chains

from medledger.core.keys import SigningKey
from medledger.ledger.clock import Clock


@pytest.fixture
def chains(tmp_path: Path, clock: Clock) -> Iterator[Chains]:
    made = Chains(tmp_path, clock)
    yield made
    made.close_all()


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()
