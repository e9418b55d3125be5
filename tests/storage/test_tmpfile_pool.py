"""The pool of unnamed files: ready ahead of need, refilled, named by ``link``, closed whole.

Real files on the test's file system; the one fault injected is a kernel that
refuses ``O_TMPFILE`` (``os.open`` answering ``EOPNOTSUPP``, as some file
systems do).
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from medledger.storage.tmpfile_pool import TmpfilePool, link


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.002)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[TmpfilePool]:
    opened = TmpfilePool(str(tmp_path), size=4)
    yield opened
    opened.close()


def test_a_taken_file_has_no_name_until_linked(pool: TmpfilePool, tmp_path: Path) -> None:
    assert pool.take() is None  # the first take starts the pool: nothing is ready yet
    until(lambda: len(pool) == 4, "the pool is full")
    fd = pool.take()
    assert fd is not None and pool.taken == 1
    try:
        info = os.fstat(fd)
        assert info.st_nlink == 0 and stat.S_IMODE(info.st_mode) == 0o600
        assert list(tmp_path.iterdir()) == []
        os.write(fd, b"bytes of a blob")
        link(fd, tmp_path / "named")
        assert (tmp_path / "named").read_bytes() == b"bytes of a blob"
        assert os.fstat(fd).st_nlink == 1
        with pytest.raises(FileExistsError):
            link(fd, tmp_path / "named")
    finally:
        os.close(fd)


def test_the_pool_is_refilled_when_asked_and_stays_bounded(pool: TmpfilePool) -> None:
    """Not at each take: the taker asks once its flush is done (see ``refill``)."""
    pool.start()
    until(lambda: len(pool) == 4, "the pool is full")
    taken = [pool.take(), pool.take(), pool.take()]
    try:
        assert None not in taken
        time.sleep(0.05)
        assert len(pool) == 1
        pool.refill()
        until(lambda: len(pool) == 4, "the pool is refilled")
        pool.refill()
        time.sleep(0.05)
        assert len(pool) == 4
    finally:
        for fd in taken:
            if fd is not None:
                os.close(fd)


def test_close_closes_every_file_not_taken(tmp_path: Path) -> None:
    before = open_fds()
    pool = TmpfilePool(str(tmp_path), size=4)
    pool.start()
    until(lambda: len(pool) == 4, "the pool is full")
    assert open_fds() == before + 4
    pool.close()
    assert open_fds() == before
    assert pool.take() is None
    pool.close()  # again: nothing to do


def test_a_file_system_without_o_tmpfile_is_asked_once(
    pool: TmpfilePool, no_o_tmpfile: list[int]
) -> None:
    assert pool.take() is None
    until(lambda: not pool.supported, "the pool gives up")
    assert [pool.take() for _ in range(5)] == [None] * 5
    time.sleep(0.05)
    assert no_o_tmpfile == [1]


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_takes_none_of_its_parents_files(pool: TmpfilePool) -> None:
    """Parent and child would both write the one inode."""
    pool.start()
    until(lambda: len(pool) == 4, "the pool is full")
    pid = os.fork()
    if pid == 0:
        os._exit(0 if pool.take() is None else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(pool) == 4
