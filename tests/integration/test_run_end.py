"""A run ends at its token budget: stage 0 stops within a step of it, the coordinator takes a final
checkpoint and tells the workers, which leave and exit 0; a restart that raises the budget goes on
from that checkpoint.

Real coordinator, real workers training the tiny model as a two-stage pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from configs.loader import load_config
from tests.harness.coordinator_process import CoordinatorProcess
from tests.harness.swarm import TRAINING_PACE
from tests.harness.worker_process import SMALL, Workers
from worker.telemetry.trace import read_trace

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess, pytest.mark.training]

UP_S = 90.0
TRAINING = load_config("tiny").training
STEP = TRAINING.tokens_per_step
BUDGET = 40 * STEP + 1000  # not whole steps: the last grant passes it by less than one
RAISED = BUDGET + 20 * STEP


def budget_flags(total: int) -> list[str]:
    # periodic checkpoints off: the final one is taken anyway
    return ["--set", f"training.total_tokens={total}", "--set", "coordinator.checkpoint_interval_s=0"]


def driven_tokens(traces: list[Path], since: float = 0.0) -> int:
    """Tokens stage 0 trained, from its "step" events."""
    return sum(e["samples"] * TRAINING.seq_len for t in traces if t.exists() for e in read_trace(t)
               if e["event"] == "step" and e["time"] >= since)


def finish(workers: list, coordinator: CoordinatorProcess) -> list[dict]:
    """Every worker exits 0 by itself, having been told the run is complete: their "complete" events."""
    done = []
    for worker in workers:
        exit_event = worker.wait_exit(timeout=UP_S)
        assert exit_event["code"] == 0, worker.output
        complete = worker.events("complete")
        assert complete, f"no 'complete' event:\n{worker.output}\n--- coordinator\n{coordinator.output}"
        done.append(complete[0])
    return done


@pytest.mark.fault("the token budget is reached, then raised on a restart")
def test_the_run_ends_at_its_budget_with_a_final_checkpoint_and_a_raised_budget_goes_on(
    tmp_path: Path, workers: Workers
) -> None:
    traces = [tmp_path / f"worker{i}.jsonl" for i in range(2)]
    first = CoordinatorProcess(tmp_path / "state", *TRAINING_PACE, *budget_flags(BUDGET))
    try:
        for trace in traces:
            workers.spawn("--coordinator", first.endpoint, "--host", "127.0.0.1", *SMALL, "--trace", str(trace))
        done = finish(workers, first)
        driven = driven_tokens(traces)
        assert BUDGET <= driven < BUDGET + STEP, (driven, BUDGET)  # stopped within one step of the budget
        status = done[0]["status"]
        assert status.startswith("run complete: ") and "final checkpoint" in status, status
        assert all("Traceback" not in w.output for w in workers)
        swarm = first.swarm()
        checkpoint = swarm.last_checkpoint
        assert checkpoint.trained_tokens >= BUDGET, checkpoint
        folder = tmp_path / "state" / "checkpoints" / f"{checkpoint.checkpoint_id:06d}"
        manifest = json.loads((folder / "manifest.json").read_text())
        assert len(manifest["stages"]) == 2 and manifest["trained_tokens"] >= BUDGET
        assert f"final checkpoint {checkpoint.checkpoint_id}" in first.line_matching(r"^run complete: ")
        assert "swarmtrain_run_complete 1.0" in first_metrics(first)
        ended = max(e["time"] for t in traces for e in read_trace(t))
        assert first.terminate() == 0
    finally:
        first.kill()

    # the operator raises the budget: the same state dir goes on from the final checkpoint
    second = CoordinatorProcess(tmp_path / "state", *TRAINING_PACE, *budget_flags(RAISED))
    try:
        more = [tmp_path / f"again{i}.jsonl" for i in range(2)]
        again = [workers.spawn("--coordinator", second.endpoint, "--host", "127.0.0.1", *SMALL, "--trace", str(t))
                 for t in more]
        finish(again, second)
        resumed = [e for t in more for e in read_trace(t) if e["event"] == "resume"]
        assert resumed and all(e["checkpoint"] == checkpoint.checkpoint_id for e in resumed), resumed
        extra = driven_tokens(more, since=ended)
        # the budget goes on from the tokens the last stage counted, which the driver's count may trail
        assert RAISED - STEP <= driven + extra < RAISED + STEP, (driven, extra, RAISED)
    finally:
        second.kill()


def first_metrics(coordinator: CoordinatorProcess) -> str:
    import urllib.request

    url = coordinator.line_matching(r"^metrics: ").split()[1]
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()
