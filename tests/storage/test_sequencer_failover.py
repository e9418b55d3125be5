"""The failover of the sequencer between an institution's hosts, end to end (decision 0050).

Real embedded PostgreSQL, two real ``node start`` processes on copies of one node
directory: writes through both, the active one SIGKILLed under load. Writes resume
through the standby within a bounded time, every acknowledged write is readable with
its acknowledged content, ``medledger verify`` passes and the chain has one block per
height. The scenario is the one ``medledger bench failover`` measures.
"""

from __future__ import annotations

from pathlib import Path

from medledger.benchmarks.failover import FailoverSettings, failover_scenario

#: Each step of the scenario (writes resuming after the kill among them) must happen within
#: this; a bound against a hang, not a figure: the resume time is ``medledger bench
#: failover``'s to measure, and a loaded machine must not fail a correct failover.
STEP_DEADLINE_S = 120.0


def test_writes_resume_through_the_standby_and_nothing_acknowledged_is_lost(
    pg_dsn: str, tmp_path: Path
) -> None:
    run = failover_scenario(
        tmp_path,
        pg_dsn,
        FailoverSettings(
            writers=2, acks_before_kill=5, acks_after_kill=10, deadline_s=STEP_DEADLINE_S
        ),
    )
    logs = "\n".join(f"--- {name}:\n{text}" for name, text in run["logs"].items())
    assert run["active_before"]["role"] == "active", logs
    standby = run["standby_before"]
    assert standby["role"] == "standby" and standby["active"], logs
    assert standby["epoch"] == run["active_before"]["epoch"], logs
    assert run["lost"] == 0, f"acknowledged writes lost: {run['lost_ids']}\n{logs}"
    # Writes resumed through the standby: 10 acknowledged after the kill, within the deadline.
    assert 0 <= run["resume_s"] <= STEP_DEADLINE_S, logs
    assert run["acked_total"] >= run["acked_before_kill"] + 10, logs
    after = run["survivor_after"]
    assert after is not None and after["role"] == "active", logs
    assert after["epoch"] == run["active_before"]["epoch"] + 1, logs
    assert run["survivor_exit"] == 0, logs
    assert run["verify_ok"], run["verify_output"]
    assert run["fork_free"], f"{run['blocks']} blocks\n{logs}"
