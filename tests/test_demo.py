"""`make demo` is part of the README contract: it must run and tell the true story."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cli_support import medledger_command


def test_demo_runs_and_its_network_verifies(tmp_path: Path) -> None:
    root = tmp_path / "net"
    demo = subprocess.run(
        [*medledger_command(), "demo", "--dir", str(root)],
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert demo.returncode == 0, demo.stderr
    out = " ".join(demo.stdout.split())  # rich wraps lines to the terminal width
    assert "Traceback" not in demo.stdout + demo.stderr
    # The three attacks are caught; the re-signed rewrite only with the consortium's anchors.
    assert out.count("verification FAILED") >= 3
    assert "not found anywhere" in out  # no patient name in any file of any node
    assert "equivocation evidence against riverside-clinic" in out
    node = root / "st-mary-hospital"
    verify = subprocess.run(
        [*medledger_command(), "verify", "--consortium", "--dir", str(node)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    assert "quorum certificate" in verify.stdout and "published root" in verify.stdout
    status = subprocess.run(
        [*medledger_command(), "consortium", "status", "--dir", str(node)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert status.returncode == 0 and "EQUIVOCATION by riverside-clinic" in status.stdout


def test_demo_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    demo = subprocess.run(
        [*medledger_command(), "demo", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert demo.returncode == 1
    assert demo.stderr.startswith("error:") and len(demo.stderr.strip().splitlines()) == 1
