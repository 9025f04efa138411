"""A round leader that stays in the swarm but starts no rounds does not stop its stage averaging.

Three real workers form one stage of three replicas. The one with the lowest peer id, which
should lead every averaging round, runs with `--withhold-rounds`: it trains, heartbeats and
serves, but starts no round. The other two pass it over once none has come for the takeover
floor (worker.replicas.leadership), and the next replica leads: the two end rounds on the same
anchor. A leader that only stalled, and starts rounds again, finds the others' anchor newer
than its own: it takes theirs instead of rolling them back, and leads all three again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hivemind.p2p import PeerID

from tests.harness.coordinator_process import CoordinatorProcess, wait_for
from tests.harness.swarm import TRAINING_PACE, identities
from tests.harness.worker_process import WorkerProcess, Workers
from worker.telemetry.trace import read_trace

pytestmark = [pytest.mark.multiprocess, pytest.mark.training]

Rounds = Callable[[int], list[dict]]
# the floor under a replica's patience with its leader, shortened from 30 s: a stall must outlast it
TAKEOVER_S = 10.0


@contextmanager
def stage_of_three(tmp_path: Path, started: Workers,
                   withhold: list[str]) -> Iterator[tuple[list[WorkerProcess], Rounds, str]]:
    """Three replicas of one stage, the leader run with `--withhold-rounds *withhold`: the
    workers, each one's averaging rounds from its trace, and the leader's peer id."""
    coordinator = CoordinatorProcess(tmp_path / "state", *TRAINING_PACE,
                                     "--set", f"training.leader_takeover_s={TAKEOVER_S}")
    try:
        traces = [tmp_path / f"worker{i}.jsonl" for i in range(3)]
        keys = identities(tmp_path / "keys", 3)
        mine = [started.spawn("--coordinator", coordinator.endpoint, "--host", "127.0.0.1", "--link-mbps", "10000",
                      "--trace", str(trace), "--identity", str(key), *(["--withhold-rounds", *withhold] if i == 0 else []))
                for i, (trace, key) in enumerate(zip(traces, keys, strict=True))]

        def one_stage_of_three() -> bool:
            swarm = coordinator.swarm()
            return len(swarm.stages) == 1 and swarm.stages[0].active_workers == 3
        wait_for(one_stage_of_three, timeout=60, what="one stage with three replicas", poll=0.25)

        def rounds(i: int) -> list[dict]:
            return [e for e in (read_trace(traces[i]) if traces[i].exists() else []) if e["event"] == "sync"]
        yield mine, rounds, PeerID.from_identity(keys[0].read_bytes()).to_base58()
        for worker in mine:
            assert "Traceback" not in worker.output, worker.output
    finally:
        for worker in started:
            worker.kill()
        coordinator.kill()


def shared_round(rounds: Rounds, leader: int, size: int) -> tuple[dict, list[dict]] | None:
    """A round `leader` led that `size` replicas ended on, and its followers' ends of it."""
    followed: dict[str, list[dict]] = {}
    for i in {0, 1, 2} - {leader}:
        for e in rounds(i):
            if not e["leader"]:
                followed.setdefault(e["round"], []).append(e)
    return next(((e, followed[e["round"]]) for e in rounds(leader)
                 if e["leader"] and e["agreed"] >= size and len(followed.get(e["round"], [])) >= size - 1), None)


def wait_round(mine: list[WorkerProcess], rounds: Rounds, leader: int, size: int, timeout: float) -> None:
    try:
        led, followed = wait_for(lambda: shared_round(rounds, leader, size), timeout=timeout, poll=0.5,
                                 what=f"a round of {size} led by worker {leader}")
    except TimeoutError as err:
        raise AssertionError(f"{err}\n" + "".join(f"\nworker {i}:\n{w.output[-3000:]}"
                                                  for i, w in enumerate(mine))) from None
    assert {led["digest"]} == {e["digest"] for e in followed}, (led, followed)  # all on the same anchor


@pytest.mark.fault("a round leader that starts no rounds for a while, then comes back behind the stage")
def test_replicas_pass_over_a_silent_leader_which_on_its_return_takes_their_newer_anchor_and_leads_again(
    tmp_path: Path, workers: Workers
) -> None:
    # One swarm for both halves (each would cost a minute of a 3-replica swarm on its own): while
    # silent, the leader is as one that never starts a round; then it comes back.
    stall_s = TAKEOVER_S + 30  # long enough for the stand-in to lead a few rounds
    with stage_of_three(tmp_path, workers, [str(stall_s)]) as (mine, rounds, silent):
        wait_round(mine, rounds, leader=1, size=2, timeout=TAKEOVER_S + 90)
        passed = mine[1].wait_event("leadership", lambda e: e["change"] == "passed_over", timeout=1)
        assert (passed["stage"], passed["peer"]) == (0, silent), (passed, silent)
        assert passed["silence_s"] >= TAKEOVER_S, passed
        standing = mine[1].wait_event("leadership", lambda e: e["change"] == "standing_in", timeout=1)
        assert (standing["stage"], standing["silent"]) == (0, 1), standing
        # back: its first round finds the others on a newer anchor, so it takes theirs
        caught_up = mine[0].wait_event("catch_up", timeout=120)
        assert caught_up["stage"] == 0 and caught_up["peer"], caught_up
        # while silent it led nothing, and nobody led it: it was left out of the stage's averaging
        # (its silence began after its first event, when its stage was built)
        silent_until = mine[0].events()[0]["time"] + stall_s
        assert not [e for e in rounds(0) if e["time"] < silent_until], rounds(0)
        wait_round(mine, rounds, leader=0, size=3, timeout=90)
        mine[1].wait_event("leadership", lambda e: e["change"] == "lower_leads" and e["stage"] == 0, timeout=30)
