"""A backup file is untrusted input: :class:`~medledger.storage.backup.BackupArchive` checks it first."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from medledger.core.errors import InvalidInput
from medledger.storage.backup import FORMAT, VERSION, BackupArchive


def _archive(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _manifest(**changes: object) -> bytes:
    manifest = {"format": FORMAT, "version": VERSION, "schema_versions": {"chain.db": 1}}
    manifest.update(changes)
    return json.dumps(manifest).encode()


@pytest.mark.parametrize(
    ("members", "words"),
    [
        ({"manifest.json": _manifest(), "../escape": b"x"}, "not a plain relative file"),
        ({"manifest.json": _manifest(), "/etc/evil": b"x"}, "not a plain relative file"),
        ({"node/node.toml": b"x"}, "unreadable backup manifest"),
        ({"manifest.json": b"[1, 2]"}, "not a medledger backup"),
        ({"manifest.json": _manifest(format="other")}, "not a medledger backup"),
        ({"manifest.json": _manifest(version=99)}, "backup format version 99"),
        ({"manifest.json": _manifest(schema_versions={"chain.db": "x"})}, "unreadable"),
    ],
)
def test_a_hostile_or_foreign_archive_is_refused_before_anything_is_written(
    tmp_path: Path, members: dict[str, bytes], words: str
) -> None:
    path = _archive(tmp_path / "b.tar.gz", members)
    with pytest.raises(InvalidInput, match=words):
        BackupArchive(path)


def test_a_file_that_is_no_tar_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "b.tar.gz"
    path.write_bytes(b"not a tar at all")
    with pytest.raises(InvalidInput, match="is not a medledger backup"):
        BackupArchive(path)


def test_a_good_archive_restores_only_node_files_into_the_node_directory(tmp_path: Path) -> None:
    path = _archive(
        tmp_path / "b.tar.gz",
        {"manifest.json": _manifest(), "node/node.toml": b"config", "other/x": b"ignored"},
    )
    root = tmp_path / "node"
    root.mkdir()
    with BackupArchive(path) as archive:
        assert archive.schema_versions == {"chain.db": 1}
        archive.extract_node_files(root)
    assert [p.name for p in root.iterdir()] == ["node.toml"]
    assert (root / "node.toml").read_bytes() == b"config"
