"""``medledger bench workers --cpu-per-worker``: the node's whole process tree in a cgroup
of N x SHARE cores for the run with N workers, removed afterwards; a clear refusal
where cgroups cannot be used.

Shape and what the kernel held, never timing thresholds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cli_support import medledger_command
from medledger.localnet.cgroups import cpu_groups_unavailable_reason

_SHARE = 0.45
_REASON = cpu_groups_unavailable_reason()


def _bench(tmp_path: Path, *extra: str, prefix: tuple[str, ...] = ()) -> tuple[Any, Path]:
    out = tmp_path / "workers.json"
    proc = subprocess.run(
        [
            *prefix,
            *medledger_command(),
            "bench",
            "workers",
            "--quick",
            "--dir",
            str(tmp_path / "work"),
            "--creates",
            "20",
            "--reads",
            "40",
            "--clients",
            "8",
            "--open-loop-seconds",
            "1",
            "--json-out",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc, out


@pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
def test_the_node_and_its_workers_run_in_a_group_of_n_times_the_share(tmp_path: Path) -> None:
    # One run, with 2 workers: the sequencer parent and two forked workers, in a group of
    # 2 x SHARE cores (the run with 1 worker is the same code with N = 1).
    proc, out = _bench(tmp_path, "--workers", "2", "--cpu-per-worker", str(_SHARE))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["settings"]["cpu_per_worker"] == _SHARE
    assert [run["workers"] for run in results["runs"]] == [2]
    for run in results["runs"]:
        count, cgroup = run["workers"], run["cgroup"]
        # What the kernel held while the node ran (read back, not what was meant).
        assert cgroup["period_us"] == 100_000
        assert cgroup["quota_us"] == round(count * _SHARE * 100_000)
        assert cgroup["quota_cores"] == round(count * _SHARE, 3)
        assert Path(cgroup["path"]).parent == Path(cgroup["top"])
        for moment in ("at_start", "at_end"):
            seen = cgroup[moment]
            # One process with 1 worker; the sequencer parent and its 2 workers with 2.
            assert len(seen["node_pids"]) == (1 if count == 1 else count + 1), seen
            assert set(seen["node_pids"]) <= set(seen["group_pids"]), seen
            assert seen["node_in_group"] is True
        for op in ("reads", "creates"):
            phase = run[op]
            assert phase["errors"] == 0, phase["first_error"]
            throttling = phase["throttling"]
            assert 0 <= throttling["nr_throttled"] <= throttling["nr_periods"]
            assert 0 <= phase["machine_idle_share"] <= 1
            assert phase["client_cpu_utilization"] >= 0
            # Every create and every read (its access entry) is on the private chain.
            assert 1 <= phase["blocks"] <= phase["requests"]
        total = cgroup["throttling_total"]
        assert total["nr_periods"] >= run["reads"]["throttling"]["nr_periods"]
        assert not Path(cgroup["top"]).exists()  # nothing of it left in /sys/fs/cgroup
    assert "(node in a cgroup of workers x 0.45 cores)" in proc.stdout


def test_without_cgroups_the_command_says_why_and_starts_nothing(tmp_path: Path) -> None:
    if _REASON is not None:
        prefix: tuple[str, ...] = ()
        reason = _REASON
    else:
        # A machine whose cgroup file system has no cpu controller: an empty one mounted
        # over /sys/fs/cgroup in a private mount namespace of the command alone.
        unshare = shutil.which("unshare")
        assert unshare is not None, "unshare(1) is needed to show a machine without cgroups"
        prefix = (
            unshare,
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount -t tmpfs none /sys/fs/cgroup && exec "$@"',
            "sh",
        )
        reason = "no cgroup cpu controller (neither v2 cpu.max nor v1 cpu.cfs_quota_us)"
    proc, out = _bench(tmp_path, "--cpu-per-worker", "0.5", prefix=prefix)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: --cpu-per-worker: {reason}"]
    assert not out.exists()
    assert not (tmp_path / "work").exists()  # no node was made
