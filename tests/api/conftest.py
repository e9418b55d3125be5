"""Fixtures of the HTTP API tests: one real node served by uvicorn per test module."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from api_helpers import LiveServer, start_server, stop_server


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A fresh node on a free port of 127.0.0.1, stopped (and the node closed) after the module."""
    server = start_server(tmp_path_factory.mktemp("api") / "node")
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture
def clinician(live: LiveServer) -> Iterator[httpx.Client]:
    with live.client(live.clinician) as client:
        yield client


@pytest.fixture
def auditor(live: LiveServer) -> Iterator[httpx.Client]:
    with live.client(live.auditor) as client:
        yield client
