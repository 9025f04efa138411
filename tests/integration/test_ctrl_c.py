"""Ctrl-C at any point of a worker's life: one press leaves cleanly, a second exits at once.

A terminal's Ctrl-C is a SIGINT to the whole foreground process group. The harness starts each
worker in a session of its own, so `os.killpg(its pid, SIGINT)` is the press as a volunteer makes
it: it reaches the worker, its guard, its DHT process and its P2P daemon alike. The presses land
at spread-out moments of the start-up (measured first on this machine: loading, the hardware
probe, finding the coordinator through the DHT, starting the data plane, joining, building the
stage) and while it trains. Each time the worker must be gone within a deadline without a
traceback, having left the swarm when it had joined, and leave no process of its group behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from configs.process_guard import process_table
from protos import swarmtrain_pb2 as pb
from tests.harness.coordinator_process import CoordinatorProcess, wait_for
from tests.harness.swarm import TRAINING_PACE, worker_info
from tests.harness.worker_process import WorkerProcess, Workers

pytestmark = [pytest.mark.multiprocess, pytest.mark.training]

FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)  # of the start-up, where the presses land
GONE_S = 20.0  # one press: the worker leaves in order (a step to finish, a 2 s Leave at most)


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[CoordinatorProcess]:
    process = CoordinatorProcess(tmp_path / "state", *TRAINING_PACE)
    yield process
    process.kill()


def press(worker: WorkerProcess) -> None:
    os.killpg(worker.proc.pid, signal.SIGINT)


def group(worker: WorkerProcess) -> list[int]:
    """The processes still in the worker's process group (its guard, DHT process, P2P daemon)."""
    return [pid for pid, (_, pgid, _) in process_table().items() if pgid == worker.proc.pid]


def assert_gone_cleanly(worker: WorkerProcess, codes: tuple[int, ...]) -> int:
    try:
        code = worker.wait(GONE_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {GONE_S:.0f}s after Ctrl-C:\n{worker.output}") from None
    assert code in codes, (code, worker.output)
    assert "Traceback" not in worker.output, worker.output
    wait_for(lambda: not group(worker), timeout=10, what="no process of the worker's group left")
    return code


@pytest.mark.fault("Ctrl-C at any point of a worker's start-up or training")
def test_one_ctrl_c_at_any_point_of_the_start_up_or_training_leaves_cleanly(
    coordinator: CoordinatorProcess, workers: Workers
) -> None:
    peer = coordinator.line_matching(r"^DHT: ").split()[1]
    args = ("--peers", peer, "--host", "127.0.0.1")
    # the start-up's length on this machine now: from the start to the first trained step
    started = time.monotonic()
    first = workers.spawn(*args)
    first.wait_event("step", timeout=120)
    startup = time.monotonic() - started
    press(first)
    assert_gone_cleanly(first, (0,))
    assert first.events("stopping") and first.events("exit")[-1]["code"] == 0, first.output
    # it said goodbye: the coordinator lets it go at once, not after the 5 s heartbeat timeout
    info = worker_info(coordinator, first.events("assigned")[0]["worker_id"])
    assert info is not None and info.state != pb.WORKER_STATE_ACTIVE, info

    outcomes = []
    for fraction in FRACTIONS:
        worker = workers.spawn(*args)
        time.sleep(fraction * startup)  # not a wait for readiness: the moment of the press
        press(worker)
        # 130: pressed before the worker's handlers were in place (while Python loads torch)
        code = assert_gone_cleanly(worker, (0, 130))
        reached = [e["event"] for e in worker.events()]
        if "assigned" in reached:  # it had joined: it must have said goodbye
            assert "stopping" in reached, (reached, worker.output)
        outcomes.append((fraction, code, reached[-3:]))
    print(f"start-up {startup:.1f}s; presses (fraction, exit code, last events): {outcomes}")
    # the sweep reached the joined part of the start-up, not only the loading
    assert any("stopping" in last for _, _, last in outcomes), outcomes


@pytest.mark.fault("a second Ctrl-C while the first waits on a frozen coordinator")
def test_a_second_ctrl_c_exits_at_once_while_the_first_waits_on_a_frozen_coordinator(
    coordinator: CoordinatorProcess, workers: Workers
) -> None:
    worker = workers.spawn("--coordinator", coordinator.endpoint, "--host", "127.0.0.1")
    worker.wait_event("step", timeout=120)
    os.kill(coordinator.proc.pid, signal.SIGSTOP)  # the goodbye now waits out its 2 s timeout
    try:
        mark = worker.mark()
        press(worker)
        worker.wait_event("stopping", after=mark, timeout=15)
        pressed = time.monotonic()
        press(worker)
        code = assert_gone_cleanly(worker, (130,))
        took = time.monotonic() - pressed
    finally:
        os.kill(coordinator.proc.pid, signal.SIGCONT)
    assert code == 130 and took < 5, (code, took, worker.output)
