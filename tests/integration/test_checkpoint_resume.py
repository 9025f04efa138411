"""A real swarm checkpoints itself, stops entirely, and a new swarm resumes from its last checkpoint.

A coordinator and two `worker` processes (two stages) train with a checkpoint every few
seconds: each stage's writer uploads its part, the coordinator completes the checkpoint and
keeps the newest two. Then every process gets SIGKILL. A new coordinator on the same state dir
and two new workers (fresh processes, nothing of the old ones but the coordinator's directory)
form the pipeline again; no live replica holds either stage, so both resume from the newest
complete checkpoint: their parameters are bit-identical to what the writers saved (digests in
the traces; where the new plan splits the layers elsewhere, to the stored files' layers), stage 0 resumes at the saved step and data position, and the loss goes on from
where it was rather than from the seed's.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from configs.loader import load_config
from tests.harness.coordinator_process import CoordinatorProcess, wait_for
from tests.harness.worker_process import SMALL, Workers
from worker.model.stage import StageModule
from worker.replicas import params_digest
from worker.telemetry.trace import read_trace

pytestmark = [pytest.mark.multiprocess, pytest.mark.training]

INTERVAL_S = 3.0
FAST = ["--set", "coordinator.heartbeat_interval_s=0.5", "--set", "coordinator.heartbeat_timeout_s=5",
        "--set", "coordinator.lease_s=30", "--set", f"coordinator.checkpoint_interval_s={INTERVAL_S}",
        "--set", "coordinator.checkpoints_kept=2", "--set", "coordinator.checkpoint_timeout_s=30"]
SEED_LOSS = 5.5  # byte-level tokens start near ln(256)


def events(path: Path, kind: str) -> list[dict]:
    return [e for e in read_trace(path) if e["event"] == kind] if path.exists() else []


def span_of(traces: list[Path], stage: int) -> tuple[int, int]:
    """The layers a new worker resumed `stage` with: those of the assignment before its resume."""
    for trace in traces:
        span, found = None, None
        for e in read_trace(trace) if trace.exists() else []:
            if e["event"] == "assign":
                span = (e["layers"][0], e["layers"][1])
            elif e["event"] == "resume" and e["stage"] == stage:
                found = span
        if found is not None:
            return found
    raise AssertionError(f"no resume of stage {stage} after an assignment")


def stored_parameters(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("stage-*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def digest_of(stored: dict[str, torch.Tensor], start: int, end: int) -> str:
    """The digest a stage of layers [start, end) has when it holds the stored parameters."""
    names = [name for name, _ in StageModule(load_config("tiny").model, start, end).named_parameters()]
    return params_digest([stored[f"param/{name}"] for name in names])


def start_pair(started: Workers, coordinator: CoordinatorProcess, traces: list[Path]) -> None:
    for trace in traces:
        started.spawn("--coordinator", coordinator.endpoint, "--host", "127.0.0.1", *SMALL,
              "--link-mbps", "10000", "--trace", str(trace))


@pytest.mark.fault("the whole swarm killed at once, restarted on the coordinator's state")
def test_a_stopped_swarm_resumes_from_its_last_complete_checkpoint(
    tmp_path: Path, workers: Workers, coordinators: list[CoordinatorProcess], fault_cost: Callable[[int], None]
) -> None:
    state = tmp_path / "state"
    first = CoordinatorProcess(state, *FAST)
    coordinators.append(first)
    old_traces = [tmp_path / f"old{i}.jsonl" for i in range(2)]
    start_pair(workers, first, old_traces)

    def checkpoints_done() -> int:
        return first.swarm().last_checkpoint.checkpoint_id
    try:
        wait_for(lambda: checkpoints_done() >= 3, timeout=120, what="three complete checkpoints", poll=0.25)
    except TimeoutError as err:
        raise AssertionError(f"{err}\ncoordinator:\n" + "\n".join(first.lines[-30:]) +
                             "".join(f"\nworker:\n{w.output}" for w in workers)) from None
    info = first.swarm().last_checkpoint
    assert len(info.stage_steps) == 2 and all(step > 0 for step in info.stage_steps), info

    # the whole swarm stops at once: no goodbye, nothing flushed
    trained = first.swarm().progress.trained_tokens
    for worker in workers:
        worker.kill()
    first.kill_9()
    killed_at = time.time()
    kept = sorted(p.name for p in (state / "checkpoints").iterdir())
    assert len(kept) == 2 and all(name.isdigit() for name in kept), kept  # the newest two; no partial left
    manifest = json.loads((state / "checkpoints" / kept[-1] / "manifest.json").read_text())
    newest = manifest["checkpoint_id"]
    fault_cost(max(0, trained - manifest["trained_tokens"]))  # at least this much is trained again
    assert [s["stage_index"] for s in manifest["stages"]] == [0, 1]
    # at most one interval lost: the next checkpoint was due at most INTERVAL_S after this one opened
    # (plus a sweep and the upload of a part)
    assert killed_at - manifest["opened_unix"] < INTERVAL_S + 5.0, (killed_at, manifest)
    # what each writer sent for it (written before the upload: a kill right after it cannot lose it)
    saved = {e["stage"]: e for t in old_traces for e in events(t, "checkpoint_upload")
             if e["checkpoint"] == newest}
    assert set(saved) == {0, 1}, saved
    assert [saved[s]["step"] for s in (0, 1)] == [s["step"] for s in manifest["stages"]]
    old_steps = [e for t in old_traces for e in events(t, "step")]  # stage 0 writes them
    losses_before = [e["loss"] for e in old_steps if e["step"] <= saved[0]["step"]][-5:]
    assert losses_before and statistics.mean(losses_before) < SEED_LOSS - 1.0, losses_before

    stored = stored_parameters(state / "checkpoints" / kept[-1])  # before a new swarm prunes it

    # a new swarm: the coordinator's directory is all that is left of the old one
    second = CoordinatorProcess(state, *FAST)
    coordinators.append(second)
    new_traces = [tmp_path / f"new{i}.jsonl" for i in range(2)]
    start_pair(workers, second, new_traces)

    def resumed() -> dict[int, dict]:
        found = {e["stage"]: e for t in new_traces for e in events(t, "resume")}
        return found if set(found) == {0, 1} else {}
    try:
        by_stage = wait_for(resumed, timeout=90, what="both stages resumed", poll=0.25)
    except TimeoutError as err:
        raise AssertionError(f"{err}\n" + "".join(f"\nworker:\n{w.output}" for w in workers[2:])) from None
    # the new plan may split the layers elsewhere (the workers' probes differ on a busy machine):
    # each stage must hold exactly the checkpoint's parameters for its layers, the step of the file
    # that holds its first layer, and where the split is the old one, what that writer uploaded
    for stage in (0, 1):
        got, (start, end) = by_stage[stage], span_of(new_traces, stage)
        holder = next(s for s in manifest["stages"] if s["layers"][0] <= start < s["layers"][1])
        assert got["checkpoint"] == newest and got["step"] == holder["step"], (got, holder)
        assert got["digest"] == digest_of(stored, start, end), (got, start, end)
        if [start, end] == manifest["stages"][stage]["layers"]:
            assert got["digest"] == saved[stage]["digest"], (got, saved[stage])
    assert by_stage[0]["data"] == saved[0]["data"] > 0  # the data shard goes on where it stopped

    # the worker on stage 0 now (a busy machine's timeouts may have re-planned the pair since)
    stage0 = next(t for t in new_traces if events(t, "resume") and events(t, "resume")[-1]["stage"] == 0)
    try:
        wait_for(lambda: len(events(stage0, "step")) >= 5, timeout=90, what="five steps after the resume", poll=0.25)
    except TimeoutError as err:
        raise AssertionError(f"{err}\ncoordinator:\n" + "\n".join(second.lines[-30:]) +
                             "".join(f"\nworker:\n{w.output}" for w in workers[2:])) from None
    after = events(stage0, "step")[:5]
    assert [e["step"] for e in after] == list(range(saved[0]["step"] + 1, saved[0]["step"] + 6))
    # training goes on from the checkpoint's loss, not from the seed's
    assert statistics.mean(e["loss"] for e in after) < statistics.mean(losses_before) + 0.5, (after, losses_before)
    for worker in workers[2:]:
        assert "Traceback" not in worker.output, worker.output
    print(f"checkpoint {newest}: steps {[saved[s]['step'] for s in (0, 1)]}, loss before {losses_before[-1]:.3f}, "
          f"after the resume {after[0]['loss']:.3f}; "
          + f"; resumed at steps {[by_stage[s]['step'] for s in (0, 1)]}")
