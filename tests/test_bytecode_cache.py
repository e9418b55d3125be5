"""The suite's bytecode cache for child processes (``bytecode_cache``)."""

from __future__ import annotations

import os
from pathlib import Path

from bytecode_cache import enable_for_children


def test_children_get_a_private_cache_only_when_bytecode_is_off(tmp_path: Path) -> None:
    environ = {"PYTHONDONTWRITEBYTECODE": "1", "PATH": "/bin"}
    cache = enable_for_children(environ, tmp_path)
    assert cache is not None and cache.parent == tmp_path
    assert environ == {"PYTHONPYCACHEPREFIX": str(cache), "PATH": "/bin"}
    assert cache.stat().st_mode & 0o777 == 0o700
    # Bytecode on, or a prefix chosen already: nothing changes.
    for unchanged in (
        {"PATH": "/bin"},
        {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": "x"},
    ):
        before = dict(unchanged)
        assert enable_for_children(unchanged, tmp_path) is None
        assert unchanged == before


def test_a_cache_directory_others_can_write_is_not_used(tmp_path: Path) -> None:
    planted = tmp_path / f"medledger-test-pycache-{os.getuid()}"
    planted.mkdir()
    planted.chmod(0o777)  # as if made by someone else in a shared /tmp
    environ = {"PYTHONDONTWRITEBYTECODE": "1"}
    assert enable_for_children(environ, tmp_path) is None
    assert environ == {"PYTHONDONTWRITEBYTECODE": "1"}
    planted.rmdir()
    (tmp_path / planted.name).symlink_to(tmp_path)  # a link to somewhere else
    assert enable_for_children(environ, tmp_path) is None
