"""``NodeProcess`` does not leave its ``node start`` running when waiting for it fails.

Whatever ends the wait for readiness (its deadline, the process exiting, or an
interruption such as Ctrl-C in a benchmark), the process it started is stopped
and reaped before the error reaches the caller.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from medledger.localnet import nodeproc


def test_an_interrupted_wait_for_readiness_stops_the_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = real_popen(*args, **kwargs)
        started.append(proc)
        return proc

    def interrupted(url: str, tls: object = None) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(nodeproc.subprocess, "Popen", popen)
    monkeypatch.setattr(nodeproc, "_status", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            nodeproc.NodeProcess(tmp_path, passphrase=b"unused", timeout=60)
        assert len(started) == 1
        assert started[0].poll() is not None, "the node start process was left running"
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
