"""A swarm starts from a pretrained checkpoint: the model a standalone run trained and exported.

`worker --standalone` trains tiny for a while and exports it in Hugging Face format. A coordinator
started with `model.pretrained` pointing at the export serves it as checkpoint 0; of two workers
(two stages), one reads its stage from its own copy (`--pretrained`), the other downloads it from
the coordinator. The swarm's first training losses are where the standalone run ended, not a random
model's ~ln(256), and its very first is the loss a standalone run from the export computes. A worker whose copy is another checkpoint stops with one line.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.coordinator_process import CoordinatorProcess, wait_for
from tests.harness.worker_process import SMALL, Workers
from worker.telemetry.trace import read_trace

pytestmark = [pytest.mark.multiprocess, pytest.mark.training]

FAST = ["--set", "coordinator.heartbeat_interval_s=0.5", "--set", "coordinator.heartbeat_timeout_s=5",
        "--set", "coordinator.lease_s=30"]
STEPS = 80


def standalone_losses(trace: Path, *args: str) -> list[float]:
    """Run `worker --standalone` on tiny; its training losses, step by step."""
    done = subprocess.run([sys.executable, "-m", "worker.app.cli", "--standalone", "--cpu", "--trace", str(trace),
                           *args], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return [e["loss"] for e in read_trace(trace) if e["event"] == "step"]


def test_a_swarm_starts_where_the_exported_standalone_run_ended(tmp_path: Path, workers: Workers,
                                                                 coordinators: list[CoordinatorProcess]) -> None:
    export = tmp_path / "trained"
    trained = standalone_losses(tmp_path / "standalone.jsonl", "--max-steps", str(STEPS), "--export", str(export))
    # one batch's loss is noisy (±5% between neighbouring steps here): the last few steps' median
    last_loss = statistics.median(trained[-5:])
    assert len(trained) == STEPS and last_loss < math.log(256) - 1.5, trained[-5:]  # it did learn
    coordinator = CoordinatorProcess(tmp_path / "state", *FAST, "--set", f"model.pretrained={export}")
    coordinators.append(coordinator)
    assert coordinator.line_matching(r"^weights: ").endswith("(pretrained)")
    traces = [tmp_path / "local.jsonl", tmp_path / "download.jsonl"]
    workers.spawn("--coordinator", coordinator.endpoint, "--host", "127.0.0.1", *SMALL, "--link-mbps", "10000",
                  "--pretrained", str(export), "--trace", str(traces[0]))
    workers.spawn("--coordinator", coordinator.endpoint, "--host", "127.0.0.1", *SMALL, "--link-mbps", "10000",
                  "--trace", str(traces[1]))

    def resumed() -> dict[str, dict]:
        found = {t.stem: e for t in traces if t.exists() for e in read_trace(t) if e["event"] == "resume"}
        return found if len(found) == 2 else {}
    try:
        by_worker = wait_for(resumed, timeout=120, what="both stages started from checkpoint 0", poll=0.25)
    except TimeoutError as err:
        raise AssertionError(f"{err}\ncoordinator:\n{coordinator.output}" +
                             "".join(f"\nworker:\n{w.output}" for w in workers)) from None
    assert {e["checkpoint"] for e in by_worker.values()} == {0}
    assert by_worker["local"].get("source") == "local" and "source" not in by_worker["download"]
    assert sorted(e["stage"] for e in by_worker.values()) == [0, 1]
    assert "starts from the run's pretrained weights, sent by the coordinator" in workers[1].output

    first_stage = traces[0] if by_worker["local"]["stage"] == 0 else traces[1]

    def first_losses() -> list[float] | None:
        steps = [e["loss"] for e in read_trace(first_stage) if e["event"] == "step"]
        return steps[:3] if len(steps) >= 3 else None
    losses = wait_for(first_losses, timeout=120, what="the swarm's first three steps", poll=0.25)
    loss = statistics.median(losses)
    # a standalone run from the export sees the same first batch: the same loss, up to summation order
    again = standalone_losses(tmp_path / "again.jsonl", "--max-steps", "1", "--set", f"model.pretrained={export}")
    print(f"the standalone run's last five training losses {[round(x, 3) for x in trained[-5:]]}; the swarm's "
          f"first three {[round(x, 3) for x in losses]}; a standalone run's first from the export {again[0]:.3f}")
    assert abs(loss - last_loss) <= 0.10 * last_loss, (losses, trained[-5:])
    assert abs(losses[0] - again[0]) <= 0.01 * again[0], (losses, again)
    cache = sorted(p.name for p in (tmp_path / "state" / "pretrained").glob("*/*.safetensors"))
    assert cache and all(name.startswith("layer-") for name in cache)  # the downloaded stage's layers only

    # a volunteer whose copy is another checkpoint is stopped before it trains
    other = shutil.copytree(export, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "torch_dtype": "float16"}))
    wrong = workers.spawn("--coordinator", coordinator.endpoint, "--host", "127.0.0.1", *SMALL,
                          "--pretrained", str(other))
    exit_event = wrong.wait_exit(timeout=60)
    assert exit_event["code"] == 2, wrong.output
    assert "config error: --pretrained " in exit_event["message"] and "differs from the coordinator's" in exit_event["message"]
