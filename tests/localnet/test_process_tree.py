"""A command stopped by SIGTERM or SIGINT leaves no process it started behind.

Each test runs the command as a real subprocess, waits (bounded, polling) until
the processes it starts exist, signals it and then polls, again bounded, until
every one of them is gone. A failure message carries the command's output.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cli_support import medledger_command
from medledger.localnet.process_tree import Proc, descendants

#: Bound on every wait of this module (a loaded machine starts processes slowly).
DEADLINE_S = 120.0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(procs: set[Proc]) -> set[Proc]:
    """Those of ``procs`` still running (a zombie has exited: it is not)."""
    left = set()
    for pid, started in procs:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X") and int(fields[19]) == started:
            left.add((pid, started))
    return left


def _output(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.kill()
    out, _ = proc.communicate(timeout=30)
    return out.decode(errors="replace")[-4000:]


def _wait_for_children(
    proc: subprocess.Popen[bytes], enough: Callable[[set[Proc]], bool]
) -> set[Proc]:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        below = descendants(proc.pid)
        if enough(below):
            return below
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the command's processes did not all start:\n{_output(proc)}")
        time.sleep(0.1)


def _signal_and_expect_all_gone(
    proc: subprocess.Popen[bytes], started: set[Proc], signum: int
) -> None:
    """Signal ``proc``; it exits with 128 + ``signum`` and none of ``started`` survives."""
    proc.send_signal(signum)
    deadline = time.monotonic() + DEADLINE_S
    try:
        while proc.poll() is None or _alive(started):
            if time.monotonic() > deadline:
                survivors = {pid: _cmdline(pid) for pid, _ in _alive(started)}
                pytest.fail(f"left running: {survivors}\n{_output(proc)}")
            time.sleep(0.1)
        assert proc.returncode == 128 + signum, _output(proc)
    finally:
        for pid, _ in _alive(started):  # a failed test must not leave them either
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


SCRIPT = textwrap.dedent(
    """
    import subprocess, sys, time
    from medledger.localnet.process_tree import children_torn_down

    with children_torn_down(grace_s=5):
        # One in a session of its own (as nats-server is), one that ignores SIGTERM,
        # and a grandchild: none of them has a finally of this command to stop it.
        subprocess.Popen(["sleep", "300"], start_new_session=True)
        subprocess.Popen(
            [sys.executable, "-c",
             "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"]
        )
        subprocess.Popen(["sh", "-c", "sleep 300 & wait"])
        print("started", flush=True)
        time.sleep(300)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_every_process_started_inside(signum: int) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as proc:
        # three children and the shell's own sleep
        started = _wait_for_children(proc, lambda below: len(below) >= 4)
        _signal_and_expect_all_gone(proc, started, signum)


def test_bench_hybrid_stopped_by_sigterm_leaves_no_institution_or_nats_server(
    tmp_path: Path,
) -> None:
    command = [
        *medledger_command(),
        "bench",
        "hybrid",
        "--mode",
        "hybrid",
        "--ordering",
        "jetstream",
        "--institutions",
        "2",
        "--load",
        "20",
        "--seconds",
        "600",  # a step that outlasts the test: the signal always lands mid-run
        "--warmup",
        "5",
        "--writers",
        "2",
        "--plots-dir",
        str(tmp_path / "plots"),
        "--markdown",
        str(tmp_path / "benchmarks.md"),
        "--dir",
        str(tmp_path / "work"),
        "--json-out",
        str(tmp_path / "hybrid.json"),
    ]

    def running(below: set[Proc]) -> bool:
        lines = [_cmdline(pid) for pid, _ in below]
        nats = sum("nats-server" in line for line in lines)
        institutions = sum("multiprocessing" in line and "spawn_main" in line for line in lines)
        return nats >= 3 and institutions >= 2

    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        started = _wait_for_children(proc, running)
        _signal_and_expect_all_gone(proc, started, signal.SIGTERM)
    assert not (tmp_path / "hybrid.json").exists()
