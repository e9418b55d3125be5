"""Every byte is written even when ``os.write`` writes only part of it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medledger.storage import durable_files
from medledger.storage.keystore import atomic_write


def _short_writes(monkeypatch: pytest.MonkeyPatch, at_most: int) -> list[int]:
    """``os.write`` as a busy pipe or a signal makes it: at most ``at_most`` bytes a call."""
    real = os.write
    calls: list[int] = []

    def short(fd: int, data: bytes | memoryview) -> int:
        written = real(fd, bytes(data[:at_most]))
        calls.append(written)
        return written

    monkeypatch.setattr(durable_files.os, "write", short)
    return calls


def test_atomic_write_keeps_writing_after_a_short_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = bytes(range(256)) * 40
    calls = _short_writes(monkeypatch, 1000)
    target = tmp_path / "keystore.json"
    atomic_write(target, data)
    assert target.read_bytes() == data
    assert len(calls) == 11  # 10,240 bytes in pieces of at most 1,000


def test_write_all_writes_nothing_more_than_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _short_writes(monkeypatch, 3)
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        durable_files.write_all(fd, b"0123456789")
        durable_files.write_all(fd, b"")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"0123456789"
