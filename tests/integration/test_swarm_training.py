"""Two real `worker` processes train the tiny model as a two-stage pipeline under a real coordinator.

With one replica per stage and uncompressed activations (what the compression policy picks on
loopback), the pipeline does the single-process maths exactly: the same tokens in the same
order, the same loss scaling and optimizer steps. Only the order of floating-point sums may
differ between processes, so the swarm's loss curve must follow `worker --standalone`'s step
by step, to within fp32 rounding compounded over the steps compared.
"""

from __future__ import annotations

import asyncio
import math
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hivemind.p2p import P2P, PeerID

from configs.loader import load_config
from protos import swarmtrain_pb2 as pb
from tests.harness.coordinator_process import CoordinatorProcess, wait_for
from tests.harness.loopback import LOOPBACK
from tests.harness.swarm import TRAINING_PACE
from tests.harness.worker_process import SMALL, Workers
from worker.app.swarm_model import validation_losses
from worker.data.tokens import TokenData
from worker.pipeline import RequestRejected, StageClient
from worker.runtime.standalone import train_locally
from worker.telemetry.trace import read_trace

pytestmark = [pytest.mark.multiprocess, pytest.mark.training]
TRAIN_DEADLINE_S = 90.0
TARGET_LOSS = 4.0  # byte-level tokens start near ln(256) ≈ 5.5
COMPARED_STEPS = 30
# Per-stage gradient clipping differs from the single process's whole-model clipping whenever
# it triggers; without clipping the two runs do the same maths.
UNCLIPPED = ["--set", "training.grad_clip=null"]
# fp32 sums in another order differ by ~1e-7 relative; Adam amplifies such differences
# slowly over a few dozen steps. A real bug (a wrong scale, a skipped microbatch, another
# data order) moves the loss by 1e-2 or more within a few steps.
CURVE_TOLERANCE = 5e-4  # measured: 5.4e-6 at most over 30 steps


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[CoordinatorProcess]:
    process = CoordinatorProcess(tmp_path / "state", *TRAINING_PACE, *UNCLIPPED)
    yield process
    process.kill()


async def outsider_calls_forward_backward(swarm: pb.GetSwarmResponse) -> RequestRejected:
    """What the last stage answers a P2P peer that is not one of the swarm's workers."""
    last = max(swarm.stages, key=lambda s: s.stage_index)
    worker = next(w for w in swarm.workers if w.stage_index == last.stage_index)
    key = f"{swarm.run_id}.stage{last.stage_index}.{last.layer_start}-{last.layer_end}"
    p2p = await P2P.create(host_maddrs=[LOOPBACK])
    try:
        client = StageClient(p2p)
        peer = PeerID.from_base58(worker.peer_id)
        client.add_addresses(peer, worker.multiaddrs)
        hidden = torch.randn(1, 8, load_config("tiny").model.d_model)
        try:
            await client.forward_backward(peer, key, hidden, torch.zeros(1, 8, dtype=torch.long), "none", 20)
        except RequestRejected as err:
            return err
        raise AssertionError("an outsider's forward_backward was served")
    finally:
        await p2p.shutdown()


def single_process_losses(steps: int) -> list[float]:
    """The per-step training loss of the same config trained in this process (`worker --standalone`)."""
    config = load_config("tiny", [override for override in UNCLIPPED if override != "--set"])
    data = TokenData(config.data, config.training.seq_len, config.training.seed)
    losses: list[float] = []
    train_locally(config, data, torch.device("cpu"), max_steps=steps, log=lambda _: None,
                  on_step=lambda _, loss: losses.append(loss))
    return losses


def test_two_workers_train_the_tiny_model_as_a_pipeline_and_follow_the_single_process_curve(
    coordinator: CoordinatorProcess, workers: Workers, tmp_path: Path
) -> None:
    # a link this fast gets uncompressed activations from the policy, whatever the measured compute
    join = ["--coordinator", coordinator.endpoint, "--host", "127.0.0.1", *SMALL, "--link-mbps", "100000"]
    first = workers.spawn(*join)
    first.wait_event("waiting", timeout=60)  # it cannot hold the model alone
    second = workers.spawn(*join)
    stages = {}
    for worker in (first, second):
        assigned = worker.wait_event("assigned", timeout=60)
        assert assigned["num_stages"] == 2, assigned
        stages[assigned["stage"]] = worker
    assert set(stages) == {0, 1}
    serving = stages[1].wait_event("serving", lambda e: e["stage"] == 1, timeout=60)
    assert serving["key"].startswith("tiny.stage1.") and serving["peer_id"], serving

    swarm = coordinator.swarm()
    assert [s.active_workers for s in swarm.stages] == [1, 1]
    for info in swarm.workers:
        assert info.peer_id and info.multiaddrs, info
        assert all(addr.startswith("/ip4/127.0.0.1/tcp/") for addr in info.multiaddrs), info.multiaddrs
    assert serving["peer_id"] in {info.peer_id for info in swarm.workers}, serving

    complete = stages[0].wait_event("pipeline", lambda e: e["complete"], timeout=60)
    assert complete["replicas"] == {"1": 1}, complete
    trace = stages[0].trace_path  # the driver's: stage 0 writes the steps
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

    def steps_traced() -> list[dict]:
        return [e for e in read_trace(trace) if e["event"] == "step"] if trace.exists() else []
    wait_for(lambda: len(steps_traced()) >= COMPARED_STEPS, timeout=TRAIN_DEADLINE_S,
             what=f"{COMPARED_STEPS} steps in the trace", poll=0.25)
    swarm_curve = [e["loss"] for e in steps_traced()[:COMPARED_STEPS]]
    assert [e["step"] for e in steps_traced()[:COMPARED_STEPS]] == list(range(1, COMPARED_STEPS + 1))
    local_curve = single_process_losses(COMPARED_STEPS)
    gaps = [abs(a - b) / b for a, b in zip(swarm_curve, local_curve, strict=True)]
    print(f"loss curves over {COMPARED_STEPS} steps: swarm {swarm_curve[0]:.4f} -> {swarm_curve[-1]:.4f}, "
          f"single process {local_curve[0]:.4f} -> {local_curve[-1]:.4f}; largest relative gap {max(gaps):.2e}")
    assert max(gaps) < CURVE_TOLERANCE, list(zip(swarm_curve, local_curve, strict=True))
    assert local_curve[-1] < local_curve[0] - 1.0  # a curve that moves: equality means something

    # a stage with a single replica serves its trained parameters, not the seed's
    seed_val, swarm_val = asyncio.run(validation_losses(coordinator.swarm(), load_config("tiny")))
    assert swarm_val < seed_val - 1.0, (seed_val, swarm_val)
    # a peer the coordinator never admitted cannot feed the stage, however well-formed its call
    refusal = asyncio.run(outsider_calls_forward_backward(coordinator.swarm()))
    assert refusal.kind == "unauthorized" and "is not an admitted worker" in refusal.message, refusal
    metrics_url = coordinator.line_matching(r"^metrics: http://").split()[-1]

    def outsider_reported() -> bool:  # the stage told the coordinator in its next heartbeat
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            text = response.read().decode()
        return re.search(r'^swarmtrain_peer_reports_total\{reason="unauthorized"\} [1-9]', text, re.M) is not None
    wait_for(outsider_reported, timeout=30, what="the refused outsider in the coordinator's metrics", poll=0.25)
    # and the running swarm's model exports to a directory Hugging Face transformers loads
    exported = subprocess.run([sys.executable, "-m", "worker.app.cli", "export", "--coordinator", coordinator.endpoint,
                               "--config", "tiny", *UNCLIPPED, "--out", str(tmp_path / "hf")],
                              capture_output=True, text=True, timeout=120, check=False, start_new_session=True)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]

    by_id = {w.worker_id: w for w in coordinator.swarm().workers}
    for info in by_id.values():
        assert info.state == pb.WORKER_STATE_ACTIVE and info.tokens_per_second > 0, info

    for worker in (first, second):
        code, _ = worker.terminate(timeout=20)
        assert code == 0, worker.output
        assert "Traceback" not in worker.output, worker.output
