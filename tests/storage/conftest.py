"""Storage fixtures: the session's real PostgreSQL server (see ``pg_server.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pg_server import shared_dsn, stop_shared_server


@pytest.fixture(scope="session", autouse=True)
def _stop_postgres_at_session_end() -> Iterator[None]:
    """Stops the shared server (if a test started it) when the session ends."""
    yield
    stop_shared_server()


@pytest.fixture
def pg_dsn() -> str:
    """DSN of the session's test database (server started on first use)."""
    return shared_dsn()
