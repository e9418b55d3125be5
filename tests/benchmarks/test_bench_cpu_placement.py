"""Where ``bench hybrid``'s NATS servers run: their own CPU groups, or their institution's."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from medledger.benchmarks.hybrid_procs import CpuPlacement
from medledger.localnet.cgroups import CpuGroups, cpu_groups_unavailable_reason

_REASON = cpu_groups_unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@pytest.fixture
def servers() -> Iterator[list[int]]:
    """Three processes standing in for the cluster's three NATS servers."""
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


def test_with_a_budget_of_their_own_each_server_is_in_its_own_group(servers: list[int]) -> None:
    with CpuGroups(2, 0.5) as institutions, CpuGroups(3, 0.25) as own:
        CpuPlacement(institutions, own).place_servers([*servers], institutions=2)
        assert [own.pids(k) for k in range(3)] == [[pid] for pid in servers]
        assert institutions.pids(0) == institutions.pids(1) == []  # no member pays for them


def test_without_one_a_server_shares_the_group_of_the_institution_it_stands_at(
    servers: list[int],
) -> None:
    with CpuGroups(2, 0.5) as institutions:
        CpuPlacement(institutions, None).place_servers([*servers], institutions=2)
        assert [institutions.pids(k) for k in range(2)] == [[servers[0]], [servers[1]]]
        # The third server stands at no institution of a 2-institution run: no group takes it.
        assert servers[2] not in institutions.pids(0) + institutions.pids(1)
