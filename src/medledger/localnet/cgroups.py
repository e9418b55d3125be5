"""An equal CPU quota per simulated institution: one cgroup each (benchmark tooling, issue #20).

On one machine, adding an institution's processes otherwise only divides
the same cores further. With a group per institution and the same hard
quota for each (cgroup v2 ``cpu.max``, or on cgroup v1 the cpu
controller's ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), every
institution gets at most ``cores`` CPUs, as if it had a machine of that
size, as long as the machine has ``count * cores`` to give.

Groups are created under a top group with a random name
(``medledger-<tag>``) directly below the controller's root, so parallel
runs never share one. :meth:`CpuGroups.close` (also on leaving ``with``,
after a failure too) moves any process still inside back to the root group
and removes every group it created. Needs root.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from medledger.core.errors import InvalidInput, MedledgerError

__all__ = ["CpuGroups", "CpuGroupsError", "cpu_groups_unavailable_reason"]

_CGROUP: Final = Path("/sys/fs/cgroup")
_PERIOD_US: Final = 100_000
_RMDIR_TIMEOUT_S = 10.0


class CpuGroupsError(MedledgerError):
    """A cgroup could not be created, filled or removed (the path and the reason)."""


def _controller_root() -> tuple[str, Path] | None:
    """``("v2", root)`` or ``("v1", cpu controller root)``, whichever has the cpu controller."""
    controllers = _CGROUP / "cgroup.controllers"
    with contextlib.suppress(OSError):
        if "cpu" in controllers.read_text().split():
            return "v2", _CGROUP
    if (_CGROUP / "cpu" / "cpu.cfs_quota_us").exists():
        return "v1", _CGROUP / "cpu"
    return None


def cpu_groups_unavailable_reason() -> str | None:
    """Why CPU quotas per group cannot be set here; ``None`` if they can."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "cgroups need Linux"
    if os.geteuid() != 0:
        return "creating cgroups needs root"
    if _controller_root() is None:
        return "no cgroup cpu controller (neither v2 cpu.max nor v1 cpu.cfs_quota_us)"
    return None


class CpuGroups:
    """``count`` cgroups, each limited to ``cores`` CPUs; use ``with`` (see module docstring)."""

    def __init__(self, count: int, cores: float) -> None:
        if not 1 <= count <= 256:
            raise InvalidInput("1 to 256 CPU groups")
        if not 0.01 <= cores <= 256:
            raise InvalidInput("a CPU quota is 0.01 to 256 cores")
        found = _controller_root()
        if found is None:
            raise CpuGroupsError(cpu_groups_unavailable_reason() or "no cpu controller")
        self.version, self._root = found
        self.count = count
        self.cores = cores
        self.top = self._root / f"medledger-{secrets.token_hex(4)}"
        self._made: list[Path] = []

    def __enter__(self) -> Self:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def describe(self) -> str:
        """E.g. ``cgroup v1 cpu.cfs_quota_us, 0.25 cores each``."""
        knob = "cpu.max" if self.version == "v2" else "cpu.cfs_quota_us"
        return f"cgroup {self.version} {knob}, {self.cores:g} cores each"

    def group(self, index: int) -> Path:
        if not 0 <= index < self.count:
            raise InvalidInput(f"no CPU group {index}")
        return self.top / f"i{index}"

    def add(self, index: int, pid: int) -> None:
        """Move process ``pid`` (all its threads; children it forks later follow) into group ``index``."""
        self._write(self.procs_file(index), str(pid))

    def procs_file(self, index: int) -> Path:
        """Group ``index``'s ``cgroup.procs``: a process that writes its own pid there joins it."""
        return self.group(index) / "cgroup.procs"

    def pids(self, index: int) -> list[int]:
        """The processes in group ``index`` now, as the kernel lists them."""
        return [int(pid) for pid in self._read(self.procs_file(index)).split()]

    def quota(self, index: int) -> tuple[int, int]:
        """``(quota_us, period_us)`` of group ``index``, read back from the kernel."""
        group = self.group(index)
        if self.version == "v2":
            quota, period = self._read(group / "cpu.max").split()
            return int(quota), int(period)
        return int(self._read(group / "cpu.cfs_quota_us")), int(
            self._read(group / "cpu.cfs_period_us")
        )

    def throttling(self, index: int) -> dict[str, int]:
        """Group ``index``'s ``cpu.stat`` counters so far: ``nr_periods`` (quota periods in
        which it ran), ``nr_throttled`` (periods in which it used up its quota and was
        held) and ``throttled_usec`` (time held; v1 counts it in nanoseconds)."""
        stat: dict[str, int] = {}
        for line in self._read(self.group(index) / "cpu.stat").splitlines():
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                stat[key] = int(value)
        if "throttled_usec" not in stat:
            stat["throttled_usec"] = stat.get("throttled_time", 0) // 1000
        return {k: stat.get(k, 0) for k in ("nr_periods", "nr_throttled", "throttled_usec")}

    def _create(self) -> None:
        self._mkdir(self.top)
        quota = max(1000, round(self.cores * _PERIOD_US))
        if self.version == "v2":
            # The cpu controller must be enabled for the children of every level.
            with contextlib.suppress(CpuGroupsError):  # already enabled at the root
                self._write(self._root / "cgroup.subtree_control", "+cpu")
            self._write(self.top / "cgroup.subtree_control", "+cpu")
        for i in range(self.count):
            group = self.group(i)
            self._mkdir(group)
            if self.version == "v2":
                self._write(group / "cpu.max", f"{quota} {_PERIOD_US}")
            else:
                self._write(group / "cpu.cfs_period_us", str(_PERIOD_US))
                self._write(group / "cpu.cfs_quota_us", str(quota))

    def close(self) -> None:
        """Move what still runs inside to the root group, then remove every group. Idempotent."""
        for group in reversed(self._made):
            deadline = time.monotonic() + _RMDIR_TIMEOUT_S
            while True:
                with contextlib.suppress(OSError):
                    for pid in (group / "cgroup.procs").read_text().split():
                        with contextlib.suppress(OSError):  # it exited meanwhile
                            (self._root / "cgroup.procs").write_text(pid)
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break  # left behind: the report says so through the exception below
                    time.sleep(0.05)
        left = [str(g) for g in self._made if g.exists()]
        self._made.clear()
        if left:
            raise CpuGroupsError(f"cgroups could not be removed: {', '.join(left)}")

    def _mkdir(self, path: Path) -> None:
        try:
            path.mkdir()
        except OSError as exc:
            raise CpuGroupsError(f"{path}: {exc.strerror or exc}") from None
        self._made.append(path)

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text()
        except OSError as exc:
            raise CpuGroupsError(f"{path}: {exc.strerror or exc}") from None

    @staticmethod
    def _write(path: Path, value: str) -> None:
        try:
            path.write_text(value)
        except OSError as exc:
            raise CpuGroupsError(f"{path} <- {value}: {exc.strerror or exc}") from None
