"""``[consortium]`` in node.toml with its environment overrides, and ``node start``'s JSON logs."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from medledger.cli.service import JsonLogFormatter
from medledger.config import ConsortiumConfig, NodePaths, load_config
from medledger.core.errors import InvalidInput


def test_a_node_without_the_section_has_no_consortium(make_node: Any) -> None:
    root, _ = make_node()
    assert load_config(root, env={}).consortium is None
    assert b"[consortium]" not in NodePaths(root=root).config.read_bytes()


def _with(root: Path, settings: ConsortiumConfig) -> None:
    replace(load_config(root, env={}), consortium=settings).save(NodePaths(root=root).config)


def test_solo_and_jetstream_sections_round_trip(make_node: Any) -> None:
    root, _ = make_node()
    solo = ConsortiumConfig(ordering="solo", order_file="../order.db", anchor=False)
    _with(root, solo)
    assert load_config(root, env={}).consortium == solo
    assert solo.order_path(root) == root / "../order.db"
    assert ConsortiumConfig(order_file="/abs/o.db").order_path(root) == Path("/abs/o.db")
    js = ConsortiumConfig(
        ordering="jetstream", nats_urls=("nats://127.0.0.1:1", "nats://127.0.0.1:2"), replicas=2
    )
    _with(root, js)
    assert load_config(root, env={}).consortium == js
    tuned = replace(js, nats_ping_interval=2, nats_max_outstanding_pings=1)
    _with(root, tuned)
    assert load_config(root, env={}).consortium == tuned


@pytest.mark.parametrize(
    "section",
    [
        {"nats_ping_interval": 0},
        {"nats_ping_interval": 1.5},
        {"nats_max_outstanding_pings": "3"},
        {"nats_max_outstanding_pings": 11},
    ],
)
def test_hung_server_detection_settings_are_checked(section: dict[str, Any]) -> None:
    base = {"ordering": "jetstream", "nats_urls": ["nats://127.0.0.1:1"]}
    with pytest.raises(InvalidInput, match="nats_"):
        ConsortiumConfig.from_env({**base, **section}, env={})


def test_environment_overrides_the_section(make_node: Any) -> None:
    root, _ = make_node()
    _with(root, ConsortiumConfig(ordering="solo"))
    env = {
        "MEDLEDGER_ORDERING": "jetstream",
        "MEDLEDGER_NATS_URLS": "nats://a:1, nats://b:2",
        "MEDLEDGER_STREAM_REPLICAS": "2",
        "MEDLEDGER_NATS_SEED": "nats.nk",
    }
    got = load_config(root, env=env).consortium
    assert got is not None
    assert (got.ordering, got.nats_urls, got.replicas, got.nats_seed) == (
        "jetstream",
        ("nats://a:1", "nats://b:2"),
        2,
        "nats.nk",
    )
    assert load_config(root, env={"MEDLEDGER_ORDER_FILE": "/x.db"}).consortium == (
        ConsortiumConfig(order_file="/x.db")
    )
    # MEDLEDGER_ORDERING alone configures a node that has no section.
    root2, _ = make_node()
    assert load_config(root2, env={"MEDLEDGER_ORDERING": "solo"}).consortium == ConsortiumConfig()


@pytest.mark.parametrize(
    "env",
    [
        {"MEDLEDGER_ORDERING": "kafka"},
        {"MEDLEDGER_ORDERING": "jetstream"},  # no NATS URLs
        {"MEDLEDGER_ORDERING": "solo", "MEDLEDGER_STREAM_REPLICAS": "0"},
        {"MEDLEDGER_ORDERING": "solo", "MEDLEDGER_STREAM_REPLICAS": "three"},
    ],
)
def test_invalid_settings_are_refused(make_node: Any, env: dict[str, str]) -> None:
    root, _ = make_node()
    with pytest.raises(InvalidInput):
        load_config(root, env=env)


def test_json_log_lines_mask_identifiers_and_exception_text() -> None:
    formatter = JsonLogFormatter()
    record = logging.LogRecord(
        "medledger.api.errors",
        logging.ERROR,
        __file__,
        1,
        "unexpected error on %s %s",
        ("GET", "/fhir/Patient/pat-123?name=Smith&birthdate=1970"),
        None,
    )
    try:
        raise ValueError("Smith")
    except ValueError:
        record.exc_info = sys.exc_info()
    record.fields = {"institution": "st-mary"}
    line = formatter.format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert set(entry) == {"time", "level", "logger", "message", "fields"}
    assert entry["level"] == "error" and entry["logger"] == "medledger.api.errors"
    assert entry["fields"] == {"institution": "st-mary", "exception": "ValueError"}
    assert "pat-123" not in line and "Smith" not in line and "1970" not in line
    assert entry["message"].startswith("unexpected error on GET /fhir/Patient/")
