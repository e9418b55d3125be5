"""``WorkerPool``'s supervision outlives a worker that cannot be started.

The pool restarts a worker that died; when starting the next one fails (no
process or pipe to be had for a moment), the supervision must try again rather
than end, and ``stop()`` must still stop every worker. The workers here are
real processes (``sleep``) adopted by the pool, so that the test exercises the
supervision alone, not a worker's start-up; the failed start is injected once.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from medledger.api import workers
from medledger.api.server import HttpLimits
from medledger.api.workers import WorkerPool, _Worker

_DEADLINE_S = 30.0


def test_a_worker_that_cannot_be_started_is_started_on_a_later_try(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_popen = subprocess.Popen
    starts: list[str] = []
    started: list[subprocess.Popen[bytes]] = []

    def popen(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        if not starts:
            starts.append("failed")
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        starts.append("started")
        proc = real_popen(["sleep", "60"], **kwargs)  # stands in for a worker
        started.append(proc)
        return proc

    monkeypatch.setattr(workers.subprocess, "Popen", popen)

    async def main() -> tuple[list[int], list[int]]:
        first = real_popen(["sleep", "60"])
        read_end, write_end = os.pipe()
        os.close(write_end)  # a worker that never says ready: not what is tested here
        with socket.socket() as listener:
            pool = WorkerPool(
                1,
                root=tmp_path,
                passphrase=b"unused",
                listener=listener,
                limits=HttpLimits(),
                plain_http=True,
                forked=[_Worker(pid=first.pid, ready_fd=read_end, popen=first)],
            )
            await pool.start()
            try:
                assert pool.pids == [first.pid]
                first.kill()
                deadline = time.monotonic() + _DEADLINE_S
                while not (pool.pids and pool.pids != [first.pid]):
                    assert time.monotonic() < deadline, f"no worker restarted: {starts}"
                    await asyncio.sleep(0.05)
                running = pool.pids
            finally:
                await pool.stop(timeout_s=_DEADLINE_S)
            return running, pool.pids

    running, after_stop = asyncio.run(main())
    assert starts == ["failed", "started"]
    assert running == [started[0].pid]
    assert after_stop == []
    assert started[0].returncode == -signal.SIGTERM
