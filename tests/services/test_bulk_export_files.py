"""Export files: AES-GCM frames bound to job, file, position and end (``services.bulk_export``)."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from medledger.core.errors import IntegrityError
from medledger.services.bulk_export import ExportFileWriter, read_export_file

JOB = "ab" * 16
KEY = bytes(range(32))
CHUNKS = [b'{"resourceType":"Patient","id":"1"}\n', b'{"resourceType":"Patient","id":"2"}\n']


def _write(path: Path, job: str = JOB) -> None:
    writer = ExportFileWriter(path, KEY, job)
    for chunk in CHUNKS:
        writer.write(chunk)
    writer.close()


def _frames(path: Path) -> list[bytes]:
    data, out = path.read_bytes(), []
    while data:
        (size,) = struct.unpack(">I", data[:4])
        out.append(data[: 4 + size])
        data = data[4 + size :]
    return out


def test_a_file_reads_back_and_holds_no_plaintext(tmp_path: Path) -> None:
    path = tmp_path / "Patient.ndjson"
    _write(path)
    assert list(read_export_file(path, KEY, JOB)) == CHUNKS
    assert b"Patient" not in path.read_bytes()
    assert os.stat(path).st_mode & 0o777 == 0o600


@pytest.mark.parametrize("damage", ["truncated", "reordered", "renamed", "other-job", "flipped"])
def test_a_changed_file_does_not_read(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "Patient.ndjson"
    _write(path)
    frames = _frames(path)
    assert len(frames) == 3  # two chunks and the empty final frame
    job = JOB
    if damage == "truncated":
        path.write_bytes(b"".join(frames[:2]))  # the end is gone: no final frame
    elif damage == "reordered":
        path.write_bytes(frames[1] + frames[0] + frames[2])
    elif damage == "renamed":
        moved = tmp_path / "Observation.ndjson"
        shutil.move(path, moved)
        path = moved
    elif damage == "other-job":
        job = "cd" * 16
    else:
        data = bytearray(path.read_bytes())
        data[30] ^= 1
        path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        list(read_export_file(path, KEY, job))
