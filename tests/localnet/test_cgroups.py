"""CPU groups per institution: an equal quota each, and nothing left behind afterwards."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from medledger.core.errors import InvalidInput
from medledger.localnet.cgroups import CpuGroups, cpu_groups_unavailable_reason

_REASON = cpu_groups_unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def _quota(group: Path, version: str) -> tuple[int, int]:
    if version == "v2":
        quota, period = (group / "cpu.max").read_text().split()
        return int(quota), int(period)
    return (
        int((group / "cpu.cfs_quota_us").read_text()),
        int((group / "cpu.cfs_period_us").read_text()),
    )


def test_each_group_gets_the_same_quota_and_is_removed_with_its_processes_kept() -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with CpuGroups(3, 0.25) as groups:
            top = groups.top
            for i in range(3):
                quota, period = _quota(groups.group(i), groups.version)
                assert quota == period // 4  # a quarter of a core each
            groups.add(1, sleeper.pid)
            assert str(sleeper.pid) in (groups.group(1) / "cgroup.procs").read_text().split()
            assert str(sleeper.pid) not in (groups.group(0) / "cgroup.procs").read_text().split()
        assert not top.exists()  # removed although a process was still inside
        assert sleeper.poll() is None  # which was moved out, not killed
    finally:
        sleeper.kill()
        sleeper.wait(10)


def test_groups_are_removed_after_a_failure_too() -> None:
    with pytest.raises(RuntimeError), CpuGroups(2, 0.5) as groups:
        top = groups.top
        assert top.is_dir()
        raise RuntimeError("the benchmark failed")
    assert not top.exists()


@pytest.mark.parametrize(("count", "cores"), [(0, 1.0), (2, 0.0), (2, 1000.0)])
def test_impossible_quotas_are_refused(count: int, cores: float) -> None:
    with pytest.raises(InvalidInput):
        CpuGroups(count, cores)


def test_an_unknown_group_is_refused() -> None:
    with CpuGroups(1, 0.5) as groups, pytest.raises(InvalidInput):
        groups.add(1, 1)


def test_a_group_reports_its_quota_processes_and_throttling_as_the_kernel_holds_them() -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with CpuGroups(1, 0.3) as groups:
            assert groups.quota(0) == (30_000, 100_000)
            assert groups.pids(0) == []
            groups.add(0, sleeper.pid)
            assert groups.pids(0) == [sleeper.pid]
            stat = groups.throttling(0)
            assert set(stat) == {"nr_periods", "nr_throttled", "throttled_usec"}
            assert 0 <= stat["nr_throttled"] <= stat["nr_periods"]
    finally:
        sleeper.kill()
        sleeper.wait(10)
