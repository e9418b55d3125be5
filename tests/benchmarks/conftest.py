"""One ``medledger bench all --quick`` run (the smoke profile), shared by every benchmark test."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cli_support import medledger_command


@pytest.fixture(scope="session")
def quick_all(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``medledger bench all --quick`` run (the smoke profile), shared by the benchmark tests."""
    out = tmp_path_factory.mktemp("bench-all")
    markdown = out / "benchmarks.md"
    markdown.write_text("# Benchmarks\n\nHand-written analysis stays.\n")
    proc = subprocess.run(
        [
            *medledger_command(),
            "bench",
            "all",
            "--quick",
            "--dir",
            str(out / "work"),
            "--results-dir",
            str(out / "results"),
            "--markdown",
            str(markdown),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
