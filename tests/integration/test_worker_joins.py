"""Real `worker` processes join a real coordinator: assignment, heartbeats, leave, restarts."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from protos import swarmtrain_pb2 as pb
from tests.harness.coordinator_process import CoordinatorProcess, wait_for

TOKEN = "let-volunteers-in"
FAST = ["--set", "coordinator.heartbeat_interval_s=0.2", "--set", "coordinator.heartbeat_timeout_s=1.5"]
ASSIGNED = r"^assigned: stage (\d) of (\d) · .* · worker (w-[0-9a-f]+)$"
# tiny trains in ~14 MB: a worker capped at 9 MiB cannot hold it alone, two can as a pipeline
SMALL = ["--max-memory", "9MiB"]


class WorkerProcess:
    """One `worker` subprocess in its own session, so that kill() also reaps its DHT children."""

    def __init__(self, *args: str) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.app.cli", "--cpu", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
        )
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, pattern: str, timeout: float = 30.0, after: int = 0) -> re.Match[str]:
        """The first line from index `after` on that matches; fails early if the worker exits."""

        def found() -> re.Match[str] | None:
            for line in self.lines[after:]:
                match = re.search(pattern, line)
                if match:
                    return match
            if self.proc.poll() is not None:
                self._pump_thread.join(5)  # the pipe is closed: read what is left, then decide
                if not any(re.search(pattern, line) for line in self.lines[after:]):
                    raise AssertionError(
                        f"worker exited ({self.proc.returncode}) before {pattern!r}:\n{self.output}")
            return None

        try:
            return wait_for(found, timeout=timeout, what=pattern)
        except TimeoutError as err:
            raise AssertionError(f"{err}; worker output:\n{self.output}") from None

    def terminate(self, timeout: float = 15.0) -> tuple[int, float]:
        """SIGTERM the worker alone, as a service manager would; its exit code and seconds taken."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - started

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(10)


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    """The workers a test starts (through spawn()); every one is reaped at the end."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.kill()


def spawn(started: list[WorkerProcess], *args: str) -> WorkerProcess:
    worker = WorkerProcess(*args)
    started.append(worker)
    return worker


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[CoordinatorProcess]:
    process = CoordinatorProcess(tmp_path / "state", *FAST, "--join-token", TOKEN)
    yield process
    process.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_info(coordinator: CoordinatorProcess, worker_id: str) -> pb.WorkerInfo | None:
    return next((w for w in coordinator.swarm().workers if w.worker_id == worker_id), None)


def heartbeats_flow(coordinator: CoordinatorProcess, worker_id: str) -> None:
    """The worker's last heartbeat keeps moving forward while it is ACTIVE."""
    seen: list[float] = []

    def advanced_twice() -> bool:
        info = worker_info(coordinator, worker_id)
        assert info is not None and info.state == pb.WORKER_STATE_ACTIVE
        if not seen or info.last_heartbeat_unix > seen[-1]:
            seen.append(info.last_heartbeat_unix)
        return len(seen) >= 3

    wait_for(advanced_twice, timeout=10, what=f"heartbeats from {worker_id}", poll=0.1)


def test_worker_found_through_the_dht_joins_beats_and_leaves_on_sigterm(
    coordinator: CoordinatorProcess, workers: list[WorkerProcess]
) -> None:
    peer = coordinator.line_matching(r"^DHT: ").split()[1]
    worker = spawn(workers, "--peers", peer, "--join-token", TOKEN, "--public-name", "carol")
    assigned = worker.wait_line(ASSIGNED)
    assert assigned.group(0).startswith("assigned: stage 0 of 1 · layers 0–3 of 4 · sync ")
    assert "· data shard 0/1 ·" in assigned.group(0)
    worker_id = assigned.group(3)
    assert worker.lines[0].startswith("hardware: CPU (")
    assert any(line.startswith(f"coordinator: {coordinator.endpoint} · config ") for line in worker.lines)
    worker.wait_line(r"^stage 0 ready: 856,064 parameters on cpu in [0-9.]+s$")

    info = worker_info(coordinator, worker_id)
    assert info is not None and info.public_name == "carol" and info.stage_index == 0
    assert info.achieved_flops > 0 and info.gpu_name == ""
    heartbeats_flow(coordinator, worker_id)

    code, took = worker.terminate()
    assert code == 0, worker.output
    assert took < 5, f"took {took:.1f}s to leave"
    assert worker.lines[-1] == "left the swarm (SIGTERM)"
    assert worker_info(coordinator, worker_id).state == pb.WORKER_STATE_LEFT
    assert "Traceback" not in worker.output


def test_a_wrong_or_missing_join_token_is_one_line_and_exit_2(coordinator: CoordinatorProcess) -> None:
    runs = {
        "wrong": ["--join-token", "not-the-token"],
        "missing": [],
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "worker.app.cli", "--cpu", "--coordinator", coordinator.endpoint, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        for name, extra in runs.items()
    }
    try:
        results = {name: (*p.communicate(timeout=60), p.returncode) for name, p in procs.items()}
    finally:
        for p in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    for name, (_, stderr, code) in results.items():
        assert code == 2, (name, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, stderr
        verb = "refused" if name == "wrong" else "requires"
        expected = f"error: the coordinator {verb} the join token: pass --join-token"
        assert lines[0].startswith(expected), lines[0]
    assert coordinator.swarm().workers == []


def test_two_small_workers_share_the_model_and_the_first_is_reassigned(
    coordinator: CoordinatorProcess, workers: list[WorkerProcess]
) -> None:
    first = spawn(workers, "--coordinator", coordinator.endpoint, "--join-token", TOKEN, *SMALL)
    # alone it cannot hold the model: the coordinator says why, and the worker waits
    first.wait_line(r"^waiting: .* · worker w-[0-9a-f]+$")
    second = spawn(workers, "--coordinator", coordinator.endpoint, "--join-token", TOKEN, *SMALL)
    stages = set()
    for worker in (first, second):
        match = worker.wait_line(ASSIGNED)
        assert match.group(2) == "2", match.group(0)
        stages.add(int(match.group(1)))
        worker.wait_line(r"^stage [01] ready: ")
    assert stages == {0, 1}
    swarm = coordinator.swarm()
    assert [s.active_workers for s in swarm.stages] == [1, 1]
    for worker in (first, second):
        assert worker.terminate()[0] == 0


def test_a_worker_marked_gone_rejoins_with_the_same_id(
    coordinator: CoordinatorProcess, workers: list[WorkerProcess]
) -> None:
    worker = spawn(workers, "--coordinator", coordinator.endpoint, "--join-token", TOKEN)
    worker_id = worker.wait_line(ASSIGNED).group(3)
    os.kill(worker.proc.pid, signal.SIGSTOP)  # silent past the heartbeat timeout
    try:
        wait_for(lambda: worker_info(coordinator, worker_id).state == pb.WORKER_STATE_GONE,
                 timeout=10, what="the frozen worker to be marked gone", poll=0.1)
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    worker.wait_line(rf"marked worker {worker_id} gone: re-joining with the same id")
    worker.wait_line(rf"^re-joined as worker {worker_id}$")
    heartbeats_flow(coordinator, worker_id)
    assert worker_info(coordinator, worker_id).stage_index == 0
    assert len(coordinator.swarm().workers) == 1
    assert worker.terminate()[0] == 0


def test_worker_rides_out_a_coordinator_restart_and_keeps_its_id(
    tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    port = free_port()  # the restarted coordinator must answer where the first one did
    args = (tmp_path / "state", *FAST, "--grpc-port", str(port))
    first = CoordinatorProcess(*args)
    try:
        worker = spawn(workers, "--coordinator", first.endpoint)
        worker_id = worker.wait_line(ASSIGNED).group(3)
        heartbeats_flow(first, worker_id)
        first.kill_9()
    finally:
        first.kill()
    mark = len(worker.lines)
    worker.wait_line(r"unreachable .*: keeping the stage and retrying", after=mark)
    second = CoordinatorProcess(*args)
    try:
        worker.wait_line(rf"reachable again; worker {worker_id}$", after=mark)
        heartbeats_flow(second, worker_id)
        assert [w.worker_id for w in second.swarm().workers] == [worker_id]
        assert worker.proc.poll() is None
        code, _ = worker.terminate()
        assert code == 0
        assert worker_info(second, worker_id).state == pb.WORKER_STATE_LEFT
    finally:
        second.kill()


def test_worker_stops_when_the_coordinator_stays_away_past_the_lease(
    tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    coordinator = CoordinatorProcess(tmp_path / "state", *FAST, "--set", "coordinator.lease_s=2")
    try:
        worker = spawn(workers, "--coordinator", coordinator.endpoint)
        worker.wait_line(ASSIGNED)
        coordinator.kill_9()
    finally:
        coordinator.kill()
    assert worker.proc.wait(20) == 1
    worker.wait_line(r"^error: the coordinator at \S+ stayed unreachable until this worker's lease ended")


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
