"""Tear down every process a command started, also when it is stopped by a signal.

A benchmark starts institution processes (``multiprocessing``), nats-servers
(in sessions of their own, so a terminal's Ctrl-C does not reach them) and node
processes. Python's default answer to SIGTERM is to die at once: no ``finally``
runs, and all of those outlive the command, holding ports, CPU and files.

:func:`children_torn_down` makes SIGTERM, SIGINT and SIGHUP raise
:class:`Terminated` in the main thread, so the ``finally`` blocks and context
managers that already stop those processes run; then, as a last line, it
signals every descendant started inside it that is still there (SIGTERM, then
SIGKILL after a bounded wait). Descendants that existed before it was entered
(an in-process caller's own servers) are left alone. Linux only (``/proc``):
elsewhere the signal handling still applies and the sweep finds nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from multiprocessing import resource_tracker
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["Terminated", "children_torn_down", "descendants"]

#: The signals that ask a command to stop.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: How long descendants get to exit after SIGTERM before SIGKILL.
_GRACE_S = 10.0

#: A process, told apart from a later one with the same PID by its start time.
Proc = tuple[int, int]


class Terminated(SystemExit):
    """The command was asked to stop by ``signum``; its exit status is 128 + ``signum``.

    A ``SystemExit``: ``except Exception`` does not swallow it, so it unwinds
    through every cleanup path to the top, where click exits with its code.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def _start_time(pid: int) -> int | None:
    """``pid``'s start time (clock ticks since boot), or ``None`` if gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):  # exited, waiting to be reaped: nothing left to stop
        return None
    return int(fields[19])


def descendants(pid: int | None = None) -> set[Proc]:
    """The live processes below ``pid`` (default: this one), children of children too."""
    root = os.getpid() if pid is None else pid
    found: set[Proc] = set()
    todo = [root]
    while todo:
        parent = todo.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for text in children:
                child = int(text)
                started = _start_time(child)
                if started is not None and (child, started) not in found:
                    found.add((child, started))
                    todo.append(child)
    return found


def _signal(procs: set[Proc], signum: int) -> None:
    for pid, started in procs:
        if _start_time(pid) == started:  # not a new process that reuses the PID
            with contextlib.suppress(OSError):
                os.kill(pid, signum)


def _alive(procs: set[Proc]) -> set[Proc]:
    return {p for p in procs if _start_time(p[0]) == p[1]}


def stop_all(procs: set[Proc], grace_s: float = _GRACE_S) -> set[Proc]:
    """SIGCONT and SIGTERM ``procs`` at once, SIGKILL those left after ``grace_s``;
    return any still there after that (none, unless the kernel is stuck)."""
    # A stopped process (a benchmark SIGSTOPs nats-servers) acts on SIGTERM only once resumed.
    _signal(procs, signal.SIGCONT)
    _signal(procs, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (left := _alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.05)
    _signal(left, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while (left := _alive(left)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@contextlib.contextmanager
def children_torn_down(grace_s: float = _GRACE_S) -> Iterator[None]:
    """Run the body with SIGTERM/SIGINT/SIGHUP raising :class:`Terminated`; on the way out
    (normal, error or signal), stop every descendant started inside it that is still alive.

    After the first signal, further ones are ignored until the cleanup is done, so
    an impatient second Ctrl-C cannot cut a ``finally`` in half; the cleanup is
    bounded (``grace_s``, then SIGKILL). Outside the main thread, signals cannot be
    caught: only the sweep applies.
    """
    # Multiprocessing's resource tracker serves the whole process (and an in-process
    # caller after us): started now, it is one of the processes left alone.
    resource_tracker.ensure_running()
    before = descendants()
    installed: dict[signal.Signals, Any] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated(signum)

    if threading.current_thread() is threading.main_thread():
        for sig in _STOP_SIGNALS:
            installed[sig] = signal.signal(sig, on_signal)
    try:
        yield
    finally:
        try:
            stop_all(descendants() - before, grace_s)
        finally:
            for sig, previous in installed.items():
                signal.signal(sig, previous)
