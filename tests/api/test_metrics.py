"""``/metrics`` against a real node: every answer is counted by status class, 5xx included."""

from __future__ import annotations

import httpx
from api_helpers import LiveServer, assert_outcome


def _series(text: str, name: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, number = line.rpartition(" ")
            values[key] = float(number)
    return values


def _answers(client: httpx.Client) -> dict[str, float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    return _series(r.text, "medledger_requests_total")


def test_an_unexpected_error_is_a_500_outcome_counted_as_5xx(live: LiveServer) -> None:
    """Issue #14 item 11: an unexpected exception escapes every route handler and is
    answered by Starlette's outermost middleware; it must still be counted."""

    async def broken() -> None:
        raise RuntimeError("a bug")

    live.app.add_api_route("/test-only/broken", broken, methods=["GET"])
    with live.client() as client:
        before = _answers(client)
        assert_outcome(client.get("/test-only/broken"), 500, code="exception")
        after = _answers(client)
    key = 'medledger_requests_total{class="5xx"}'
    assert after[key] == before[key] + 1
    # The /metrics read in between is the only 2xx answer.
    two = 'medledger_requests_total{class="2xx"}'
    assert after[two] == before[two] + 1
