"""An ASGI HTTP scope for driving an app directly, without a server or a client."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def http_scope(
    method: str, path: str, query: str = "", headers: Sequence[tuple[bytes, bytes]] = ()
) -> dict[str, Any]:
    """The scope uvicorn would pass for ``method path?query`` from a loopback client."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 50_000),
        "server": ("testserver", 80),
    }
