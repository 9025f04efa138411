"""Four workers that say their link is thin (--link-mbps 20) train as a pipeline with replicas
(2 x 2 or 1/2/1 stages: which one depends on the order of the joins and on the measured rates),
with averaging rounds whose bulk is paced at half the link while the replicas train on
(worker.pipeline.pacing, sync_round), and the codecs the policy picks for such a link.

The link is declared, not shaped (tests/benchmarks/bench_slow_links.py shapes real links): this
checks that the thin-link code paths of a real swarm train and agree, as the fast-link tests do
theirs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from protos import swarmtrain_pb2 as pb
from tests.harness.coordinator_process import CoordinatorProcess, wait_for
from tests.harness.swarm import TRAINING_PACE, agreed_rounds
from tests.harness.worker_process import SMALL, Workers
from worker.telemetry.trace import read_trace

pytestmark = [pytest.mark.multiprocess, pytest.mark.training]


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[CoordinatorProcess]:
    process = CoordinatorProcess(tmp_path / "state", *TRAINING_PACE)
    yield process
    process.kill()


def test_replicas_on_declared_thin_links_train_and_their_paced_rounds_agree(
    coordinator: CoordinatorProcess, workers: Workers, tmp_path: Path
) -> None:
    traces = [tmp_path / f"worker{i}.jsonl" for i in range(4)]
    for trace in traces:
        workers.spawn("--coordinator", coordinator.endpoint, "--host", "127.0.0.1", *SMALL,
              "--link-mbps", "20", "--trace", str(trace))
    for worker in workers:
        worker.wait_event("assigned", timeout=60)

    def placed() -> list[int] | None:
        """Replicas per stage, once all four are active and some stage has two."""
        swarm = coordinator.swarm()
        replicas = [s.active_workers for s in swarm.stages]
        ready = (len(swarm.workers) == 4 and sum(replicas) == 4 and max(replicas) >= 2
                 and all(w.state == pb.WORKER_STATE_ACTIVE for w in swarm.workers))
        return replicas if ready else None
    try:
        replicas = wait_for(placed, timeout=180, what="four active workers, a stage with two replicas", poll=0.25)
    except TimeoutError as err:
        raise AssertionError(f"{err}: {[s.active_workers for s in coordinator.swarm().stages]}\n"
                             + "\n".join(coordinator.lines[-30:])) from None
    replicated = [stage for stage, n in enumerate(replicas) if n >= 2]

    def steps_of(trace: Path) -> int:
        return sum(1 for e in read_trace(trace) if e["event"] == "step") if trace.exists() else 0

    def trained_and_synced() -> bool:  # stage 0's replicas drive: only they write steps
        return (sum(steps_of(t) >= 20 for t in traces) >= replicas[0]
                and all(len(agreed_rounds(traces, s)) >= 2 for s in replicated))
    try:
        wait_for(trained_and_synced, timeout=150, poll=0.5,
                 what=f"20 steps on each of {replicas[0]} driver(s) and two rounds in stages {replicated}")
    except TimeoutError as err:
        raise AssertionError(f"{err}\n" + "\n\n".join(w.output for w in workers)) from None
    for stage in replicated:  # the paced rounds left leader and follower on one anchor
        rounds = agreed_rounds(traces, stage)
        assert all(len(digests) == 1 for digests in rounds.values()), (stage, rounds)
    losses = [e["loss"] for t in traces for e in read_trace(t) if e["event"] == "step"]
    assert min(losses[-10:]) < losses[0] - 1.0, (losses[:3], losses[-10:])
