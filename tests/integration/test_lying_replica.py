"""One of four replicas lies in every averaging round; the swarm trains as well as without it.

Four real workers that each hold the whole tiny model form one stage of four replicas, so their
rounds combine pseudo-gradients with CenteredClip. In one run all are honest; in the other, one
worker runs with `--lie-scale -1000` and sends every pseudo-gradient sign-flipped and 1000×
larger. At the same number of trained tokens, the swarm's validation loss with the liar stays
within 10% of the clean run's (in a plain mean, one ×1000 update of four would outweigh the
other three 333 to 1); the round leaders report the liar as an outlier, and after
repeated reports the coordinator bans it: it leaves the swarm with a one-line reason and exit 2.

When the liar has the lowest peer id it leads the rounds and sends their outcome ×-1000 too:
the followers refuse it, keep their parameters, and report the leader until it is banned; then
the next replica leads and the three honest ones average again.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from pathlib import Path

import pytest

from configs.loader import load_config
from protos import swarmtrain_pb2 as pb
from tests.harness.coordinator_process import CoordinatorProcess, wait_for
from tests.harness.swarm import TRAINING_PACE, identities
from tests.harness.worker_process import Workers
from worker.app.swarm_model import validation_losses
from worker.telemetry.trace import read_trace

# two swarms of four train 450k tokens each (~80 s each on two quiet cores), every wait with its own
# deadline, generous for a busy machine: more than the suite's default 300 s
pytestmark = [pytest.mark.multiprocess, pytest.mark.training, pytest.mark.timeout(1200)]

TOKENS = 450_000  # the clean and the attacked run are compared once the swarm has trained this many
LEADER_TOKENS = 300_000  # a lying leader is banned by ~250k: then the swarm must have trained on
LIE = ["--lie-scale", "-1000"]


def run_swarm(tmp_path: Path, started: Workers, name: str, liar: int | None,
              tokens: int = TOKENS) -> tuple[float, float, str, list[dict]]:
    """Seed and swarm validation loss at `tokens` trained tokens, the coordinator's metrics text, and
    every replica's averaging rounds. `liar`: which worker lies, by peer id order (0 leads)."""
    # three reports ban (the default is 5): repeated, and reached well within a run of TOKENS
    coordinator = CoordinatorProcess(tmp_path / name / "state", *TRAINING_PACE,
                                     "--set", "coordinator.ban_after_reports=3")
    try:
        traces = [tmp_path / name / f"worker{i}.jsonl" for i in range(4)]
        keys = identities(tmp_path / name / "keys", 4)
        mine = []
        for i, trace in enumerate(traces):
            mine.append(started.spawn("--coordinator", coordinator.endpoint, "--host", "127.0.0.1",
                              "--link-mbps", "10000", "--trace", str(trace), "--identity", str(keys[i]),
                              *(LIE if i == liar else [])))

        def all_four_joined_one_stage() -> bool:
            # a liar banned before the last worker joined counts: on a busy machine the fourth
            # worker once joined only after three had trained long enough to ban a lying leader
            swarm = coordinator.swarm()
            banned = sum(w.state == pb.WORKER_STATE_BANNED for w in swarm.workers)
            return len(swarm.stages) == 1 and swarm.stages[0].active_workers + banned == 4
        try:  # four workers importing torch and probing their hardware at once: slow on a busy machine
            wait_for(all_four_joined_one_stage, timeout=180, what="four workers joined, in one stage", poll=0.25)
        except TimeoutError as err:
            swarm = coordinator.swarm()
            raise AssertionError(f"{err}: stages {[(s.layer_start, s.layer_end, s.active_workers) for s in swarm.stages]}"
                                 f", planner: {swarm.planner_note}\ncoordinator:\n" + "\n".join(coordinator.lines[-20:]))

        def trained() -> bool:
            now = coordinator.swarm().progress.trained_tokens
            if liar is not None and not gone_at and mine[liar].proc.poll() is not None:
                gone_at.append(now)
            return now >= tokens
        gone_at: list[int] = []
        try:
            wait_for(trained, timeout=400, what=f"{tokens:,} trained tokens", poll=0.2)
        except TimeoutError as err:
            raise AssertionError(f"{err}\n" + "".join(f"\nworker:\n{w.output[-3000:]}" for w in mine)) from None
        # a lying leader's own parameters carry its lie: measure once it is gone
        after_ban = liar == 0
        if not after_ban:
            seed_val, swarm_val = asyncio.run(validation_losses(coordinator.swarm(), load_config("tiny")))

        def rounds() -> list[dict]:  # every replica's averaging rounds so far, from the traces
            return [e for t in traces for e in (read_trace(t) if t.exists() else []) if e["event"] == "sync"]
        if liar is not None:
            try:
                # `is not None`: a liar that exited 0 (told the run is complete) must fail below, not time out
                wait_for(lambda: mine[liar].proc.poll() is not None, timeout=180, what="the liar banned and gone")
            except TimeoutError as err:
                raise AssertionError(f"{err}\ncoordinator:\n" + "\n".join(coordinator.lines[-40:])
                                     + f"\nrounds with outliers: {[e for e in rounds() if e.get('outliers')][-5:]}"
                                     + f"\nliar:\n{mine[liar].output[-3000:]}") from None
            code, exited = mine[liar].proc.returncode, mine[liar].wait_exit(timeout=10)
            assert code == 2 and re.search(r"^error: worker w-\S+ was banned after \d+ outlier reports",
                                           exited["message"]), (exited, mine[liar].output)
            assert "Traceback" not in mine[liar].output, mine[liar].output
            states = [w.state for w in coordinator.swarm().workers]
            assert states.count(pb.WORKER_STATE_BANNED) == 1 and states.count(pb.WORKER_STATE_ACTIVE) == 3, states
        if after_ban:
            seed_val, swarm_val = asyncio.run(validation_losses(coordinator.swarm(), load_config("tiny")))
        # Rounds come every ~10 s and take a few steps' time (two lock waits per replica), so on
        # 2 busy cores the swarm can reach `tokens` before one gathered three replicas: wait for one
        # (it reached TOKENS first in 1 of 4 CI runs). Three must also end on its outcome: a lying
        # leader's rounds gather everyone, and everyone else refuses them.
        try:
            wait_for(lambda: any(e["participants"] >= 3 and e["agreed"] >= 3 for e in rounds()), timeout=120,
                     what="a round of three or more replicas", poll=0.5)
        except TimeoutError:
            led = [{k: e.get(k) for k in ("step", "participants", "agreed", "seconds", "problems")}
                   for e in rounds() if e.get("leader")]
            raise AssertionError(f"no round of three or more replicas; the rounds led: {led}") from None
        metrics_url = coordinator.line_matching(r"^metrics: http://").split()[-1]
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            metrics = response.read().decode()
        for worker in mine:
            assert "Traceback" not in worker.output, worker.output
        if liar is not None:
            print(f"the liar was banned and gone by {gone_at[0] if gone_at else tokens:,} trained tokens")
        return seed_val, swarm_val, metrics, rounds()
    finally:
        for worker in started:
            worker.kill()
        coordinator.kill()


@pytest.mark.long
@pytest.mark.fault("one replica of four sends sign-flipped x1000 pseudo-gradients")
def test_a_replica_sending_flipped_thousandfold_updates_costs_under_ten_percent_of_validation_loss(
    tmp_path: Path, workers: Workers
) -> None:
    seed, clean, _, _ = run_swarm(tmp_path, workers, "clean", liar=None)
    _, attacked, metrics, _ = run_swarm(tmp_path, workers, "attacked", liar=3)
    print(f"validation loss at {TOKENS:,} tokens: seed {seed:.3f}, clean {clean:.3f}, "
          f"one liar of four {attacked:.3f} ({attacked / clean - 1:+.1%})")
    print(f"attacked {attacked:.3f}")
    assert clean < seed - 1.0, (seed, clean)  # both runs trained: the comparison means something
    # Honest runs differ by up to ~2%, and the liar's clipped share adds a few more: runs with the
    # liar measured +5.2% (which failed a 5% bound), +3.0%, +2.3% and -1.9% at 600k tokens
    assert attacked < clean * 1.10, (clean, attacked)
    outliers = re.search(r'^swarmtrain_peer_reports_total\{reason="outlier"\} (\S+)', metrics, re.MULTILINE)
    assert outliers and float(outliers.group(1)) >= 1, "the liar was never reported as an outlier"


@pytest.mark.fault("the round leader sends its followers a x-1000 outcome")
def test_a_lying_round_leader_is_refused_by_its_followers_and_banned(
    tmp_path: Path, workers: Workers
) -> None:
    seed, attacked, metrics, rounds = run_swarm(tmp_path, workers, "lying-leader", liar=0, tokens=LEADER_TOKENS)
    refused = [p for e in rounds if not e["leader"] for p in e.get("problems", [])
               if p.startswith("refused the outcome of a round led by")]
    assert refused, "no follower refused the lying leader's outcome"
    outliers = re.search(r'^swarmtrain_peer_reports_total\{reason="outlier"\} (\S+)', metrics, re.MULTILINE)
    assert outliers and float(outliers.group(1)) >= 1, "the lying leader was never reported"
    # a follower that had taken even one ×-1000 outcome would train from garbage: the swarm
    # trained (the other test compares an honest run's loss; this one's bound is the seed's)
    print(f"validation loss at {LEADER_TOKENS:,} tokens: seed {seed:.3f}, with a lying leader {attacked:.3f}; "
          f"{len(refused)} outcomes refused")
    assert attacked < seed - 1.0, (seed, attacked)
