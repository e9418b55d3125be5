"""``api.server``: the limits a node's HTTP server is built with."""

from __future__ import annotations

import pytest
from api_helpers import LiveServer

from medledger.api.server import GuardedHttpToolsProtocol, HttpLimits, server_config


@pytest.mark.parametrize(
    "bad",
    [
        {"head_timeout_s": 0},
        {"body_timeout_s": -1},
        {"idle_timeout_s": 0},
        {"max_head_bytes": 100},
    ],
)
def test_nonsense_limits_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        HttpLimits(**bad)  # type: ignore[arg-type]


def test_the_config_uses_the_guarded_protocol_with_its_limits(live: LiveServer) -> None:
    limits = HttpLimits(head_timeout_s=2, body_timeout_s=3, idle_timeout_s=4, max_head_bytes=4096)
    config = server_config(live.app, port=1, limits=limits)
    assert isinstance(config.http, type) and issubclass(config.http, GuardedHttpToolsProtocol)
    assert config.http.limits == limits
    assert config.timeout_keep_alive == 4
    assert config.server_header is False and config.access_log is False
    # The protocol's own answers are counted by the app's metrics.
    before = live.app.state.metrics.answers["4xx"]
    observe = config.http.observe
    assert observe is not None
    observe(431)
    assert live.app.state.metrics.answers["4xx"] == before + 1
    assert live.app.state.metrics.refusals["headers_too_large"] >= 1


def test_the_live_test_server_is_guarded(live: LiveServer) -> None:
    assert issubclass(live.server.config.http_protocol_class, GuardedHttpToolsProtocol)
