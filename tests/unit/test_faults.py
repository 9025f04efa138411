"""The fault-injection harness on stand-in processes: faults fire in step order on the right
process group, and each is recorded with the progress it fired at."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.coordinator_process import wait_for
from tests.harness.faults import Fault, FaultInjector, trace_steps


class Sleeper:
    """A process in a session of its own, with a child in its group (as a worker's P2P daemon)."""

    def __init__(self) -> None:
        code = ("import subprocess, sys, time; "
                "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")
        self.proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def state_of(pid: int) -> str:
    """The process's state letter in /proc ('T' stopped, 'S' sleeping...); '' once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return ""


def group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


@pytest.fixture
def sleepers() -> Iterator[list[Sleeper]]:
    started: list[Sleeper] = []
    yield started
    for s in started:
        FaultInjector([Fault(0, "kill", 0)], [s], progress=lambda: 0).poll()


def test_faults_fire_in_step_order_on_the_whole_group_and_are_recorded(sleepers: list[Sleeper]) -> None:
    sleepers.extend([Sleeper(), Sleeper()])
    wait_for(lambda: all(len(group_members(s.proc.pid)) == 2 for s in sleepers), what="two processes per group")
    step = [0]
    faults = [Fault(5, "resume", 1), Fault(2, "stop", 1), Fault(3, "kill", 0), Fault(4, "restart", 0)]

    def respawn(i: int) -> Sleeper:
        sleepers.append(Sleeper())
        return sleepers[-1]
    targets = list(sleepers)
    injector = FaultInjector(faults, targets, progress=lambda: step[0], respawn=respawn)
    first0, first1 = sleepers[0].proc.pid, sleepers[1].proc.pid

    assert injector.poll() == [] and not injector.done
    step[0] = 2
    assert [f.fault.action for f in injector.poll()] == ["stop"]
    wait_for(lambda: all(state_of(p) == "T" for p in group_members(first1)), what="worker 1's group stopped")
    step[0] = 4  # two faults are due at once: both fire, in step order
    fired = injector.poll()
    assert [(f.fault.action, f.step) for f in fired] == [("kill", 4), ("restart", 4)]
    assert sleepers[0].proc.returncode == -9
    wait_for(lambda: not group_members(first0), what="worker 0's whole group gone")
    assert targets[0] is sleepers[2] and fired[1].pid == sleepers[2].proc.pid != first0
    step[0] = 9
    injector.poll()
    wait_for(lambda: all(state_of(p) in "SR" for p in group_members(first1)), what="worker 1's group running")
    assert injector.done and [f.fault.at_step for f in injector.fired] == [2, 3, 4, 5]
    assert all(a.time <= b.time for a, b in zip(injector.fired, injector.fired[1:]))


def test_a_slow_peer_is_stopped_part_of_the_time_and_left_running(sleepers: list[Sleeper]) -> None:
    sleepers.append(Sleeper())
    injector = FaultInjector([Fault(0, "slow", 0, seconds=1.0, running=0.5)], sleepers, progress=lambda: 0)
    injector.poll()
    seen = set()
    wait_for(lambda: seen.add(state_of(sleepers[0].proc.pid)) or {"T", "S"} <= seen, timeout=5,
             what="the peer both stopped and running", poll=0.01)
    injector.close()
    assert state_of(sleepers[0].proc.pid) in "SR"


def test_a_bad_schedule_is_refused_and_a_restart_needs_a_dead_worker(sleepers: list[Sleeper]) -> None:
    with pytest.raises(ValueError, match="unknown fault action 'explode'"):
        Fault(1, "explode", 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="slow fault needs"):
        Fault(1, "slow", 0)
    sleepers.append(Sleeper())
    injector = FaultInjector([Fault(0, "restart", 0)], sleepers, progress=lambda: 0, respawn=lambda i: Sleeper())
    with pytest.raises(RuntimeError, match="still running"):
        injector.poll()


def test_progress_counts_step_events_across_traces_and_skips_a_torn_line(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(json.dumps({"event": e, "time": 0}) for e in ("step", "sync", "step")) + "\n")
    b.write_text(json.dumps({"event": "step", "time": 0}) + '\n{"event": "st')
    assert trace_steps([a, b, tmp_path / "missing.jsonl"]) == 3
