"""A stage whose every replica dies takes the whole swarm back to its newest checkpoint, together.

Four workers that cannot hold the tiny model alone train it as two stages of two replicas, with
a checkpoint every few seconds. Then both replicas of stage 1 get SIGKILL at once: that stage's
trained state is gone everywhere but in the checkpoints. The coordinator moves a survivor onto
that stage and rolls the swarm back as a whole: the replica that keeps its stage, trained
further than any checkpoint, rebuilds from the same checkpoint as the moved one (bit-identical
parameters, the saved step), the progress figure moves back to the checkpoint's tokens, and the
rollback is counted in the metrics with its reason. Before, the moved worker started its stage
from the checkpoint (or the seed) beside a stage trained on, while the coordinator counted on.

(Three workers, 2 + 1, was the first layout tried: the exact planner gives three such workers a
stage each, 1 + 1 + 1, which is faster, and a kill then changes the split as well.)
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.coordinator_process import CoordinatorProcess, wait_for
from tests.harness.swarm import TRAINING_PACE
from tests.harness.worker_process import SMALL, WorkerProcess, Workers

pytestmark = [pytest.mark.multiprocess, pytest.mark.training]

CHECKPOINTS = ["--set", "coordinator.checkpoint_interval_s=3", "--set", "coordinator.first_checkpoint_s=1",
               "--set", "coordinator.checkpoints_kept=50", "--set", "coordinator.checkpoint_timeout_s=30"]


def stage_of(worker: WorkerProcess) -> int:
    assigned = worker.events("assign")
    return assigned[-1]["stage"] if assigned else -1


@pytest.mark.fault("SIGKILL of both replicas of a stage at once")
def test_losing_the_only_replica_of_a_stage_rolls_every_stage_back_to_the_newest_checkpoint(
    tmp_path: Path, workers: Workers, fault_cost: Callable[[int], None]
) -> None:
    state = tmp_path / "state"
    coordinator = CoordinatorProcess(state, *TRAINING_PACE, *CHECKPOINTS)
    try:
        four = [workers.spawn("--coordinator", coordinator.endpoint, "--host", "127.0.0.1", *SMALL,
                              "--link-mbps", "10000") for _ in range(4)]

        def two_by_two() -> bool:
            swarm = coordinator.swarm()
            return sorted(s.active_workers for s in swarm.stages) == [2, 2] and \
                sorted(stage_of(w) for w in four) == [0, 0, 1, 1] and swarm.last_checkpoint.checkpoint_id >= 2
        try:
            wait_for(two_by_two, timeout=150, what="two stages of two replicas and two complete checkpoints",
                     poll=0.25)
        except TimeoutError as err:
            swarm = coordinator.swarm()
            raise AssertionError(f"{err}: stages {[s.active_workers for s in swarm.stages]}, workers on "
                                 f"{[stage_of(w) for w in four]}, checkpoint {swarm.last_checkpoint.checkpoint_id}\n"
                                 + "\n".join(coordinator.lines[-40:])) from None
        uploads = {(e["checkpoint"], e["stage"]): e for w in four for e in w.events("checkpoint_upload")}
        victims = [w for w in four if stage_of(w) == 1]
        survivors = [w for w in four if stage_of(w) == 0]
        marks = [w.mark() for w in survivors]
        before = coordinator.swarm().progress.trained_tokens  # a lower bound on the tokens at the rollback
        for victim in victims:
            victim.kill()

        swarm = wait_for(lambda: (s := coordinator.swarm()).progress.rollbacks and s, timeout=60,
                         what="a rollback", poll=0.25)
        assert swarm.generation == 1, swarm
        rolled_back = swarm.progress.rolled_back_tokens
        fault_cost(rolled_back)
        assert swarm.progress.trained_tokens <= before, (swarm.progress, before)  # the figure moved back
        # both survivors drop their stage: the one moved, and the one that keeps its layers
        for worker, mark in zip(survivors, marks, strict=True):
            assert worker.wait_event("rollback", timeout=30, after=mark)["generation"] == 1

        # both stages resume from the same checkpoint: the one that kept training too
        resumed = [w.wait_event("resume", timeout=60, after=mark) for w, mark in zip(survivors, marks, strict=True)]
        checkpoint = resumed[0]["checkpoint"]
        assert {e["checkpoint"] for e in resumed} == {checkpoint}, resumed
        assert {e["stage"] for e in resumed} == {0, 1}, resumed
        manifest = json.loads((state / "checkpoints" / f"{checkpoint:06d}" / "manifest.json").read_text())
        steps = {s["stage_index"]: s["step"] for s in manifest["stages"]}
        for event in resumed:
            saved = uploads.get((checkpoint, event["stage"]))
            assert saved is not None, (event, sorted(uploads))
            assert event["digest"] == saved["digest"] and event["step"] == steps[event["stage"]], (event, saved)
        # the progress figure went back to the checkpoint's tokens
        assert rolled_back > 0 and manifest["trained_tokens"] + rolled_back >= before, (manifest, rolled_back, before)

        metrics_url = coordinator.line_matching(r"^metrics: http://").split()[-1]
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            metrics = response.read().decode()
        assert re.search(r'^swarmtrain_rollbacks_total\{reason="stage_lost"\} 1\.0$', metrics, re.M), metrics

        # and the pipeline trains on from the checkpoint's step
        driver = next(w for w, e in zip(survivors, resumed, strict=True) if e["stage"] == 0)
        after = driver.mark()
        first = driver.wait_event("step", timeout=90, after=after)
        assert first["step"] == steps[0] + 1, (first, steps)
        for worker in survivors:
            assert "Traceback" not in worker.output, worker.output
        print(f"rolled back {rolled_back:,} tokens to checkpoint {checkpoint} at {manifest['trained_tokens']:,}; "
              f"stage steps {steps}")
    finally:
        for worker in workers:
            worker.kill()
        coordinator.kill()
