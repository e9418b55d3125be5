"""Tests for :mod:`medledger.config`: what a configuration shows of itself."""

from __future__ import annotations

import pytest

from medledger.config import StorageConfig, public_base_url
from medledger.core.errors import InvalidInput


def test_storage_repr_hides_the_dsn_and_its_password() -> None:
    storage = StorageConfig(store="postgres", dsn="host=db1 user=st_mary password=Hunter2-secret")
    text = repr(storage)
    assert "postgres" in text
    assert "Hunter2-secret" not in text and "dsn=" not in text
    assert storage.dsn.endswith("password=Hunter2-secret")  # still used to connect


def test_the_public_url_is_the_advertised_one_else_a_named_listening_address() -> None:
    """What the node calls itself (the SMART issuer, ``aud``, the portal's redirect URI),
    written as a browser writes an origin: the portal compares it with ``location.origin``."""
    advertised = "https://St-Mary.Example.org:8700/"
    assert (
        public_base_url(advertised, host="127.0.0.1", port=1) == "https://st-mary.example.org:8700"
    )
    assert public_base_url("https://node.example:443") == "https://node.example"
    assert public_base_url("http://[::1]:8080") == "http://[::1]:8080"
    assert (
        public_base_url("", scheme="http", host="127.0.0.1", port=8700) == "http://127.0.0.1:8700"
    )
    assert public_base_url("", host="::1", port=8700) == "https://[::1]:8700"
    # A wildcard address names no host a client could reach: no URL rather than a wrong one.
    for wildcard in ("0.0.0.0", "::", ""):
        assert public_base_url("", host=wildcard, port=8700) is None
    with pytest.raises(InvalidInput):
        public_base_url("https://node.example:8700/fhir")
