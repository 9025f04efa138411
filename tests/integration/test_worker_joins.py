"""Real `worker` processes join a real coordinator: assignment, heartbeats, leave, restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from protos import swarmtrain_pb2 as pb
from tests.harness import processes
from tests.harness.coordinator_process import CoordinatorProcess, wait_for
from tests.harness.swarm import free_port, heartbeats_flow, worker_info
from tests.harness.worker_process import SMALL, Workers

pytestmark = pytest.mark.multiprocess

TOKEN = "let-volunteers-in"
FAST = ["--set", "coordinator.heartbeat_interval_s=0.2", "--set", "coordinator.heartbeat_timeout_s=1.5"]


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[CoordinatorProcess]:
    process = CoordinatorProcess(tmp_path / "state", *FAST, "--join-token", TOKEN)
    yield process
    process.kill()


def test_worker_found_through_the_dht_joins_beats_and_leaves_on_sigterm(
    coordinator: CoordinatorProcess, workers: Workers
) -> None:
    peer = coordinator.line_matching(r"^DHT: ").split()[1]
    worker = workers.spawn("--peers", peer, "--join-token", TOKEN, "--public-name", "carol")
    assigned = worker.wait_event("assigned")
    assert (assigned["stage"], assigned["num_stages"], assigned["layers"]) == (0, 1, [0, 4]), assigned
    worker_id = assigned["worker_id"]
    ready = worker.wait_event("ready")
    assert (ready["stage"], ready["parameters"], ready["device"]) == (0, 856_064, "cpu"), ready

    info = worker_info(coordinator, worker_id)
    assert info is not None and info.public_name == "carol" and info.stage_index == 0
    assert info.achieved_flops > 0 and info.gpu_name == ""
    heartbeats_flow(coordinator, worker_id)

    code, took = worker.terminate()
    assert code == 0, worker.output
    assert took < 5, f"took {took:.1f}s to leave"
    (exited,) = worker.events("exit")
    assert (exited["code"], exited["message"]) == (0, ""), exited
    assert worker_info(coordinator, worker_id).state == pb.WORKER_STATE_LEFT
    # the lines a volunteer reads first and last, on purpose: what they say is the product here
    assert worker.lines[0].startswith("hardware: CPU ("), worker.output
    assert any(line.startswith(f"coordinator: {coordinator.endpoint} · config ") for line in worker.lines)
    assert worker.lines[-1] == "left the swarm (SIGTERM)"
    assert "Traceback" not in worker.output


def test_a_wrong_or_missing_join_token_is_one_line_and_exit_2(coordinator: CoordinatorProcess) -> None:
    runs = {
        "wrong": ["--join-token", "not-the-token"],
        "missing": [],
    }
    procs = {
        name: processes.start(
            [sys.executable, "-m", "worker.app.cli", "--cpu", "--coordinator", coordinator.endpoint, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name, extra in runs.items()
    }
    try:
        results = {name: (*p.communicate(timeout=60), p.returncode) for name, p in procs.items()}
    finally:
        for p in procs.values():
            processes.reap(p)
    # the one line on stderr is what the volunteer reads, on purpose: its wording is the product here
    for name, (_, stderr, code) in results.items():
        assert code == 2, (name, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, stderr
        verb = "refused" if name == "wrong" else "requires"
        expected = f"error: the coordinator {verb} the join token: pass --join-token"
        assert lines[0].startswith(expected), lines[0]
    assert coordinator.swarm().workers == []


def test_two_small_workers_share_the_model_and_the_first_is_reassigned(
    coordinator: CoordinatorProcess, workers: Workers
) -> None:
    first = workers.spawn("--coordinator", coordinator.endpoint, "--join-token", TOKEN, *SMALL)
    # alone it cannot hold the model: the coordinator says why, and the worker waits
    waiting = first.wait_event("waiting")
    assert waiting["reason"] and waiting["worker_id"].startswith("w-"), waiting
    second = workers.spawn("--coordinator", coordinator.endpoint, "--join-token", TOKEN, *SMALL)
    stages = set()
    for worker in (first, second):
        assigned = worker.wait_event("assigned")
        assert assigned["num_stages"] == 2, assigned
        stages.add(assigned["stage"])
        worker.wait_event("ready", lambda e, stage=assigned["stage"]: e["stage"] == stage)
    assert stages == {0, 1}
    swarm = coordinator.swarm()
    assert [s.active_workers for s in swarm.stages] == [1, 1]
    for worker in (first, second):
        assert worker.terminate()[0] == 0


@pytest.mark.fault("a worker silent past the heartbeat timeout comes back")
def test_a_worker_marked_gone_rejoins_with_the_same_id(
    coordinator: CoordinatorProcess, workers: Workers
) -> None:
    worker = workers.spawn("--coordinator", coordinator.endpoint, "--join-token", TOKEN)
    worker_id = worker.wait_event("assigned")["worker_id"]
    os.kill(worker.proc.pid, signal.SIGSTOP)  # silent past the heartbeat timeout
    try:
        wait_for(lambda: worker_info(coordinator, worker_id).state == pb.WORKER_STATE_GONE,
                 timeout=10, what="the frozen worker to be marked gone", poll=0.1)
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    assert worker.wait_event("gone")["worker_id"] == worker_id
    assert worker.wait_event("rejoined")["worker_id"] == worker_id
    heartbeats_flow(coordinator, worker_id)
    assert worker_info(coordinator, worker_id).stage_index == 0
    assert len(coordinator.swarm().workers) == 1
    assert worker.terminate()[0] == 0


@pytest.mark.fault("the coordinator restarts under a joined worker")
def test_worker_rides_out_a_coordinator_restart_and_keeps_its_id(tmp_path: Path, workers: Workers) -> None:
    port = free_port()  # the restarted coordinator must answer where the first one did
    args = (tmp_path / "state", *FAST, "--grpc-port", str(port))
    first = CoordinatorProcess(*args)
    try:
        worker = workers.spawn("--coordinator", first.endpoint)
        worker_id = worker.wait_event("assigned")["worker_id"]
        heartbeats_flow(first, worker_id)
        mark = worker.mark()
        first.kill_9()
    finally:
        first.kill()
    assert worker.wait_event("unreachable", after=mark)["worker_id"] == worker_id
    second = CoordinatorProcess(*args)
    try:
        assert worker.wait_event("reachable", after=mark)["worker_id"] == worker_id
        heartbeats_flow(second, worker_id)
        assert [w.worker_id for w in second.swarm().workers] == [worker_id]
        assert worker.proc.poll() is None
        code, _ = worker.terminate()
        assert code == 0
        assert worker_info(second, worker_id).state == pb.WORKER_STATE_LEFT
    finally:
        second.kill()


@pytest.mark.fault("the coordinator stays away past a worker's lease")
def test_worker_stops_when_the_coordinator_stays_away_past_the_lease(
    tmp_path: Path, workers: Workers
) -> None:
    coordinator = CoordinatorProcess(tmp_path / "state", *FAST, "--set", "coordinator.lease_s=2")
    try:
        worker = workers.spawn("--coordinator", coordinator.endpoint)
        worker.wait_event("assigned")
        coordinator.kill_9()
    finally:
        coordinator.kill()
    exited = worker.wait_exit(timeout=20)
    # the one line the volunteer sees, on purpose: it says why the worker stopped and what to do
    assert exited["code"] == 1 and exited["message"].startswith(
        "error: the coordinator at 127.0.0.1:"), exited
    assert "stayed unreachable until this worker's lease ended" in exited["message"], exited


# The tests below check the one line a volunteer reads for a mistake, on purpose: its wording is the product.


def run_worker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker.app.cli", *args], capture_output=True, text=True,
                          timeout=60, start_new_session=True)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "error: pass --peers MULTIADDR"),
        (["--peers", "/ip4/1.2.3.4/tcp/1/p2p/QmX", "--coordinator", "h:1"],
         "error: pass only one of --peers, --coordinator and --standalone (got --peers and --coordinator)"),
        (["--coordinator", "h:1", "--config", "tiny"],
         "error: --config: in a swarm the run config comes from"),
        (["--coordinator", "h"], "error: --coordinator h: expected HOST:PORT"),
        (["--peers", "127.0.0.1:50510"], "error: --peers 127.0.0.1:50510: not a peer multiaddr"),
        (["--coordinator", "h:1", "--max-memory", "20XB"], "error: --max-memory '20XB' is not a size"),
        (["--standalone", "--join-token", "x"], "error: --join-token: it applies to swarm mode only"),
        (["--coordinator", "h:1", "--trace", "/nonexistent-folder/trace.jsonl"],
         "error: --trace /nonexistent-folder/trace.jsonl: folder /nonexistent-folder does not exist"),
        (["--standalone", "--trace", "/"], "error: --trace /: is a folder; name a file in it"),
    ],
)
def test_command_line_mistakes_are_one_line_and_exit_2(args: list[str], expected: str) -> None:
    result = run_worker("--cpu", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr


def test_unreachable_peers_are_one_line() -> None:
    dead = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWGPGy8H8CwKfnYttHgPdGdZ2VxyMZX2RGZrakp8pUoDW2"
    result = run_worker("--cpu", "--peers", dead)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: cannot join the DHT through --peers {dead}: failed to connect to bootstrap peers; "
        "is the coordinator running, and is its DHT port open to you?"
    ]
