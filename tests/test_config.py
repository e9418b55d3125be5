"""Tests for :mod:`medledger.config`: what a configuration shows of itself."""

from __future__ import annotations

from medledger.config import StorageConfig


def test_storage_repr_hides_the_dsn_and_its_password() -> None:
    storage = StorageConfig(store="postgres", dsn="host=db1 user=st_mary password=Hunter2-secret")
    text = repr(storage)
    assert "postgres" in text
    assert "Hunter2-secret" not in text and "dsn=" not in text
    assert storage.dsn.endswith("password=Hunter2-secret")  # still used to connect
