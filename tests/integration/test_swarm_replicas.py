"""Four real `worker` processes train the tiny model as 2 stages x 2 replicas under a real coordinator.

The two workers that join second download their stage's state from a live replica; the
replicas of each stage then average in rounds led by one of them, after which both hold the
same anchor: each writes a digest of its anchor to its `--trace` file per round, and
the test compares the two replicas' digests for the same round. The swarm's model, gathered
from the stages' replicas, has a validation loss well below the seed's. Then one worker is killed
with SIGKILL: the others keep training and the coordinator re-plans without it. A worker that a
re-plan left on its layers takes the new plan version in place, without restarting its stage.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest

from configs.loader import load_config
from protos import swarmtrain_pb2 as pb
from tests.harness.coordinator_process import CoordinatorProcess, wait_for
from tests.harness.swarm import TRAINING_PACE, agreed_rounds
from tests.harness.worker_process import SMALL, Workers
from worker.app.swarm_model import validation_losses
from worker.telemetry.trace import read_trace

pytestmark = [pytest.mark.multiprocess, pytest.mark.training]

TRAIN_DEADLINE_S = 150.0
TARGET_LOSS = 4.0  # byte-level tokens start near ln(256) ≈ 5.5


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[CoordinatorProcess]:
    process = CoordinatorProcess(tmp_path / "state", *TRAINING_PACE)
    yield process
    process.kill()


def assignments(trace: Path) -> list[dict]:
    return [e for e in read_trace(trace) if e["event"] == "assign"] if trace.exists() else []


@pytest.mark.fault("SIGKILL of a replica in a 2x2 swarm")
def test_two_stages_of_two_replicas_train_agree_after_a_round_and_survive_a_sigkill(
    coordinator: CoordinatorProcess, workers: Workers, tmp_path: Path
) -> None:
    traces = [tmp_path / f"worker{i}.jsonl" for i in range(4)]
    join = ["--coordinator", coordinator.endpoint, "--host", "127.0.0.1", *SMALL, "--link-mbps", "10000"]
    for trace in traces[:2]:
        workers.spawn(*join, "--trace", str(trace))
    for worker in workers:
        worker.wait_event("assigned", timeout=60)
    for trace in traces[2:]:
        workers.spawn(*join, "--trace", str(trace))
    worker_ids = {}
    for worker, trace in zip(workers, traces, strict=True):
        assigned = worker.wait_event("assigned", timeout=60)
        assert assigned["num_stages"] == 2, assigned
        worker_ids[trace] = assigned["worker_id"]

    def two_by_two() -> bool:
        swarm = coordinator.swarm()
        return (len(swarm.workers) == 4 and [s.active_workers for s in swarm.stages] == [2, 2]
                and all(w.state == pb.WORKER_STATE_ACTIVE for w in swarm.workers))
    wait_for(two_by_two, timeout=60, what="2 stages x 2 active replicas", poll=0.25)
    for worker in workers[2:]:  # they joined stages that had a live replica
        state = worker.wait_event("state", lambda e: e["outcome"] == "downloaded", timeout=30)
        assert state["bytes"] > 100_000, state  # the stage's fp32 parameters

    seen: list[tuple[int, float]] = []

    def progress() -> tuple[int, float]:
        p = coordinator.swarm().progress
        if p.trained_tokens and (not seen or p.trained_tokens > seen[-1][0]):
            seen.append((p.trained_tokens, p.last_loss))
        return p.trained_tokens, p.last_loss

    def trained_and_synced() -> bool:
        _, loss = progress()
        synced = all(agreed_rounds(traces, s) for s in (0, 1))
        return len(seen) >= 2 and loss < TARGET_LOSS and synced
    try:
        wait_for(trained_and_synced, timeout=TRAIN_DEADLINE_S, what=f"a loss below {TARGET_LOSS} and a round per stage",
                 poll=0.5)
    except TimeoutError as err:
        logs = "\n\n".join(w.output for w in workers)
        raise AssertionError(f"{err}; progress {seen[-5:]}\n{logs}") from None
    # only a driver writes steps; the first driver may since have moved to stage 1
    first_steps = [e for t in traces for e in read_trace(t) if e["event"] == "step"]
    initial = min(first_steps, key=lambda e: e["time"])["loss"]
    assert initial > TARGET_LOSS + 1, first_steps[:3]  # from ~ln(256) at the seed's init

    def steps_of(trace: Path) -> int:
        return sum(1 for e in read_trace(trace) if e["event"] == "step")
    # both drivers train between rounds, the one that follows the other's rounds included
    wait_for(lambda: sum(steps_of(t) >= 10 for t in traces) >= 2, timeout=60, what="10 steps on two drivers",
             poll=0.5)
    for stage in (0, 1):  # every round both replicas took part in left them bit-identical
        rounds = agreed_rounds(traces, stage)
        assert rounds and all(len(digests) == 1 for digests in rounds.values()), (stage, rounds)

    # the swarm's model, gathered from a live replica of each stage, against the seed's
    initial_val, trained_val = asyncio.run(validation_losses(coordinator.swarm(), load_config("tiny")))
    print(f"validation loss {initial_val:.3f} -> {trained_val:.3f}")
    assert trained_val < initial_val - 1.0, (initial_val, trained_val)

    # SIGKILL one replica of stage 1: no Leave, no goodbye; the coordinator notices by its silence
    stage_now = {w.worker_id: w.stage_index for w in coordinator.swarm().workers}
    victim, victim_trace = next((w, t) for w, t in zip(workers, traces, strict=True)
                                if stage_now[worker_ids[t]] == 1)
    victim_id = worker_ids[victim_trace]
    version_before = coordinator.swarm().plan_version
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    tokens_at_kill = progress()[0]

    def replanned_without_victim() -> bool:
        swarm = coordinator.swarm()
        victim_info = next(w for w in swarm.workers if w.worker_id == victim_id)
        return (victim_info.state != pb.WORKER_STATE_ACTIVE and swarm.plan_version > version_before
                and all(s.active_workers >= 1 for s in swarm.stages))
    wait_for(replanned_without_victim, timeout=30, what="a re-plan without the killed worker", poll=0.25)

    def trained_on() -> bool:  # well past what was in flight at the kill
        return progress()[0] >= tokens_at_kill + 4 * 16 * 128
    try:
        wait_for(trained_on, timeout=60, what="training to go on after the kill", poll=0.25)
    except TimeoutError as err:
        raise AssertionError(f"{err}\n" + "\n\n".join(w.output for w in workers if w is not victim)) from None

    # the joins and the kill re-planned: a worker kept on its layers (2 stages: the same stage and
    # boundaries) took its new plan version in place, its stage serving or driving on throughout
    kept = [(t.name, later) for t in traces for earlier, later in pairwise(assignments(t))
            if later["layers"] == earlier["layers"]]
    assert kept and all(a.get("in_place") for _, a in kept), kept
    for worker in workers:
        if worker is victim:
            continue
        assert worker.proc.poll() is None, worker.output
        code, _ = worker.terminate(timeout=20)
        assert code == 0, worker.output
        assert "Traceback" not in worker.output, worker.output
        assert "inplace operation" not in worker.output, worker.output
