"""One coordinator per port and per state dir, and no process left behind by a crash.

Real coordinators and workers: a second coordinator on a live one's gRPC or DHT port, or on its
state dir, refuses to start with one line naming what is taken; `kill -9` of a coordinator or a
worker takes its DHT process and P2P daemons with it (configs/process_guard.py), and a
coordinator restarted on the same state dir and ports is then joined by a fresh worker.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from configs.process_guard import descendants, start_time
from tests.harness.coordinator_process import CoordinatorProcess, wait_for
from tests.harness.worker_process import Workers

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

FAST = ("--set", "coordinator.heartbeat_interval_s=0.5", "--set", "coordinator.heartbeat_timeout_s=3")
GONE_S = 5.0  # "within a few seconds": the guard looks four times a second


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[CoordinatorProcess]:
    process = CoordinatorProcess(tmp_path / "state", *FAST)
    yield process
    process.kill()


def dht_port(process: CoordinatorProcess) -> int:
    addr = process.line_matching(r"^DHT: ").split()[1]
    return int(addr.split("/tcp/")[1].split("/")[0])


def grpc_port(process: CoordinatorProcess) -> int:
    return int(process.endpoint.rsplit(":", 1)[1])


def start_second(state_dir: Path, **ports: int) -> subprocess.CompletedProcess[str]:
    flags = {"grpc": 0, "dht": 0, "metrics": 0, **ports}
    return subprocess.run(
        [sys.executable, "-m", "coordinator.app.cli", "--config", "tiny", "--host", "127.0.0.1",
         "--state-dir", str(state_dir), *(x for name, port in flags.items() for x in (f"--{name}-port", str(port)))],
        capture_output=True, text=True, timeout=90, start_new_session=True,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "coordinator ready" not in result.stdout, result.stderr
    errors = [line for line in result.stderr.splitlines() if re.match(r"(\w+ )?error: ", line)]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.fault("a second coordinator started on a live one's {which} port")
@pytest.mark.parametrize("which", ["grpc", "dht"])
def test_a_second_coordinator_on_a_live_ones_port_refuses_and_names_the_holder(
    coordinator: CoordinatorProcess, tmp_path: Path, which: str
) -> None:
    port = grpc_port(coordinator) if which == "grpc" else dht_port(coordinator)
    line = one_error_line(start_second(tmp_path / "other-state", **{which: port}))
    assert f":{port}" in line and f"--{which}-port" in line and "in use" in line, line
    # /proc names the process that listens: the coordinator itself, or its DHT's P2P daemon
    assert "holds it" in line and ("coordinator" in line or "p2pd" in line), line
    assert coordinator.swarm().plan_version >= 0  # the live one is untouched and answers


@pytest.mark.fault("a second coordinator started on a live one's state dir")
def test_a_second_coordinator_on_a_live_ones_state_dir_refuses(coordinator: CoordinatorProcess) -> None:
    line = one_error_line(start_second(coordinator.state_dir))
    assert str(coordinator.state_dir) in line and f"pid {coordinator.proc.pid}" in line, line
    assert "--state-dir" in line, line
    assert coordinator.swarm().plan_version >= 0


def living(processes: dict[int, int]) -> list[int]:
    """Those of `processes` (pid -> start time) that still run; a zombie has ended."""
    alive = []
    for pid, started in processes.items():
        if start_time(pid) != started:
            continue
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def helpers_of(pid: int) -> dict[int, int]:
    return {p: t for p in descendants(pid) if (t := start_time(p)) is not None}


def command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@pytest.mark.fault("kill -9 of a coordinator, restarted on its ports and joined")
def test_kill_9_of_a_coordinator_leaves_nothing_and_its_restart_is_joined(tmp_path: Path, workers: Workers) -> None:
    first = CoordinatorProcess(tmp_path / "state", *FAST)
    try:
        ports = {"grpc": grpc_port(first), "dht": dht_port(first)}
        helpers = wait_for(lambda: (h := helpers_of(first.proc.pid)) and any(command(p) == "p2pd" for p in h) and h,
                           what="the coordinator's P2P daemon")
        helpers.update(helpers_of(first.proc.pid))
        first.kill_9()
        wait_for(lambda: not living(helpers), timeout=GONE_S,
                 what=f"the killed coordinator's processes to end ({[command(p) for p in living(helpers)]})")
    finally:
        first.kill()
    # the same state dir (so the same DHT peer id) and ports: the multiaddr volunteers hold still works
    second = CoordinatorProcess(tmp_path / "state", *FAST, "--grpc-port", str(ports["grpc"]),
                                "--dht-port", str(ports["dht"]))
    try:
        assert grpc_port(second) == ports["grpc"] and dht_port(second) == ports["dht"]
        peers = second.line_matching(r"^DHT: ").split()[1]
        worker = workers.spawn("--peers", peers)
        assigned = worker.wait_event("assigned", timeout=90)
        assert assigned["worker_id"] in {w.worker_id for w in second.swarm().workers}
    finally:
        second.kill()


@pytest.mark.fault("kill -9 of a worker (its DHT process and P2P daemon must go too)")
def test_kill_9_of_a_worker_leaves_none_of_its_daemons(coordinator: CoordinatorProcess, workers: Workers) -> None:
    # found through the DHT, as volunteers find it: the worker's own DHT process starts too
    worker = workers.spawn("--peers", coordinator.line_matching(r"^DHT: ").split()[1])
    worker.wait_event("assigned", timeout=90)
    helpers = wait_for(lambda: (h := helpers_of(worker.proc.pid)) and any(command(p) == "p2pd" for p in h) and h,
                       timeout=60, what="the worker's P2P daemon")
    helpers.update(helpers_of(worker.proc.pid))
    worker.proc.kill()  # the worker alone, as the OOM killer would: not its process group
    worker.proc.wait(10)
    wait_for(lambda: not living(helpers), timeout=GONE_S,
             what=f"the killed worker's processes to end ({[command(p) for p in living(helpers)]})")



GUARDED = """
import subprocess, sys, time
from configs.process_guard import guard_descendants
guard_descendants()
child = subprocess.Popen(["sleep", "600"])
# a grandchild in a session of its own, as a daemon might start one
middle = subprocess.Popen([sys.executable, "-c", "import subprocess, time; "
    "print(subprocess.Popen(['sleep', '600'], start_new_session=True).pid, flush=True); time.sleep(600)"],
    stdout=subprocess.PIPE, text=True)
grandchild = int(middle.stdout.readline())
print(child.pid, middle.pid, grandchild, flush=True)
time.sleep(600)
"""


def test_the_guard_kills_every_descendant_when_its_parent_is_sigkilled() -> None:
    parent = subprocess.Popen([sys.executable, "-c", GUARDED], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    watched: dict[int, int] = {}
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        watched = {p: t for p in [*pids, *descendants(parent.pid)] if (t := start_time(p)) is not None}
        assert len(pids) == 3 and len(watched) >= 4, watched  # and the guard
        parent.kill()  # the parent alone: its group and the grandchild's session live on
        parent.wait(10)
        wait_for(lambda: not living(watched), timeout=GONE_S,
                 what=f"the guarded descendants to end ({[command(p) for p in living(watched)]})")
    finally:
        parent.kill()
        for pid in living(watched):
            os.kill(pid, signal.SIGKILL)
