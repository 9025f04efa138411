"""Two real `worker` processes train the tiny model as a two-stage pipeline under a real coordinator."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from protos import swarmtrain_pb2 as pb
from tests.integration.coordinator_process import CoordinatorProcess, wait_for
from tests.integration.test_worker_joins import ASSIGNED, SMALL, WorkerProcess, spawn, workers  # noqa: F401

FAST = ["--set", "coordinator.heartbeat_interval_s=0.5", "--set", "coordinator.heartbeat_timeout_s=5",
        "--set", "coordinator.lease_s=30"]
TRAIN_DEADLINE_S = 90.0
TARGET_LOSS = 4.0  # byte-level tokens start near ln(256) ≈ 5.5


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[CoordinatorProcess]:
    process = CoordinatorProcess(tmp_path / "state", *FAST)
    yield process
    process.kill()


def test_two_workers_train_the_tiny_model_as_a_pipeline(
    coordinator: CoordinatorProcess, workers: list[WorkerProcess]  # noqa: F811 - the fixture
) -> None:
    join = ["--coordinator", coordinator.endpoint, "--host", "127.0.0.1", *SMALL]
    first = spawn(workers, *join)
    first.wait_line(r"^waiting: .* · worker w-[0-9a-f]+$", timeout=60)  # it cannot hold the model alone
    second = spawn(workers, *join)
    stages = {}
    for worker in (first, second):
        match = worker.wait_line(ASSIGNED, timeout=60)
        assert match.group(2) == "2", match.group(0)
        stages[int(match.group(1))] = worker
    assert set(stages) == {0, 1}
    stages[1].wait_line(r"^stage 1 serving tiny\.stage1\.\d-\d on peer \w+$", timeout=60)

    swarm = coordinator.swarm()
    assert [s.active_workers for s in swarm.stages] == [1, 1]
    for info in swarm.workers:
        assert info.peer_id and info.multiaddrs, info
        assert all(addr.startswith("/ip4/127.0.0.1/tcp/") for addr in info.multiaddrs), info.multiaddrs

    stages[0].wait_line(r"^pipeline complete \(stage 1: 1 replica\(s\)\): training$", timeout=60)
    seen: list[tuple[int, float]] = []

    def trained_below_target() -> bool:
        progress = coordinator.swarm().progress
        if progress.trained_tokens and (not seen or progress.trained_tokens > seen[-1][0]):
            seen.append((progress.trained_tokens, progress.last_loss))
        return len(seen) >= 2 and progress.last_loss < TARGET_LOSS
    try:
        wait_for(trained_below_target, timeout=TRAIN_DEADLINE_S, what=f"a loss below {TARGET_LOSS}", poll=0.25)
    except TimeoutError as err:
        raise AssertionError(f"{err}; progress {seen[-5:]}\nstage 0:\n{stages[0].output}\n"
                             f"stage 1:\n{stages[1].output}") from None
    first_loss = seen[0][1]
    assert math.isfinite(first_loss) and first_loss > TARGET_LOSS, seen[:3]
    assert seen[-1][0] > seen[0][0]

    by_id = {w.worker_id: w for w in coordinator.swarm().workers}
    for info in by_id.values():
        assert info.state == pb.WORKER_STATE_ACTIVE and info.tokens_per_second > 0, info

    for worker in (first, second):
        code, _ = worker.terminate(timeout=20)
        assert code == 0, worker.output
        assert "Traceback" not in worker.output, worker.output
