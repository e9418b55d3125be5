"""Storage fixtures: the session's real PostgreSQL server (see ``pg_server.py``)."""

from __future__ import annotations

import errno
import os
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


@pytest.fixture
def no_o_tmpfile(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A file system without ``O_TMPFILE`` for the unnamed-file pool: every such open is
    refused with ``EOPNOTSUPP``. The list holds how many were refused (one item)."""
    real_open = os.open
    refused = [0]

    def open_without_tmpfile(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            refused[0] += 1
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        return real_open(path, flags, mode)

    monkeypatch.setattr("medledger.storage.tmpfile_pool.os.open", open_without_tmpfile)
    return refused
