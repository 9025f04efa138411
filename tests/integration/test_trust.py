"""Bans after peer reports and revocable join tokens, against a real coordinator process.

Reporters are plain gRPC clients heartbeating with PeerReports, as a worker's would carry them;
the expelled side is either such a client or a real `worker` process, which must exit with one
line and a non-zero code.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from protos import swarmtrain_pb2 as pb
from tests.harness.coordinator_process import CoordinatorProcess, make_profile, wait_for
from tests.harness.swarm import worker_info
from tests.harness.worker_process import Workers

pytestmark = pytest.mark.multiprocess

FAST = ["--set", "coordinator.heartbeat_interval_s=0.2", "--set", "coordinator.heartbeat_timeout_s=3"]
TOKEN = "the-config-token"
PEER_A = "12D3KooW" + "A" * 44
PEER_B = "12D3KooW" + "B" * 44
PEER_C = "12D3KooW" + "C" * 44


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[CoordinatorProcess]:
    process = CoordinatorProcess(tmp_path / "state", *FAST, "--join-token", TOKEN)
    yield process
    process.kill()


def with_peer(peer: str) -> pb.WorkerProfile:
    profile = make_profile()
    profile.peer_id = peer
    return profile


def states(coordinator: CoordinatorProcess) -> dict[str, int]:
    return {w.worker_id: w.state for w in coordinator.swarm().workers}


class KeepAlive:
    """Heartbeats for a worker joined by hand, every heartbeat interval, until stop(): without
    them a busy machine's seconds in between would time it out, which is not what is tested."""

    def __init__(self, coordinator: CoordinatorProcess, joined: pb.JoinResponse, interval_s: float = 0.2) -> None:
        self.replies: list[int] = []
        self.failure: grpc.RpcError | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(coordinator, joined, interval_s), daemon=True)
        self._thread.start()

    def _run(self, coordinator: CoordinatorProcess, joined: pb.JoinResponse, interval_s: float) -> None:
        try:
            while not self._done.wait(interval_s):
                self.replies.append(coordinator.beat(joined, plan_version=0).instruction)
        except grpc.RpcError as err:
            self.failure = err

    def stop(self) -> list[int]:
        """The instructions the beats got; a refused beat is raised here."""
        self._done.set()
        self._thread.join(15)
        if self.failure is not None:
            raise self.failure
        return self.replies


def refused(call: Callable[..., object], *args: object, **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


def report_until_state(coordinator: CoordinatorProcess, reporter: pb.JoinResponse, peer: str, worker_id: str,
                       state: int, others: list[pb.JoinResponse] = ()) -> None:
    """Heartbeat `reporter` with an outlier report against `peer` (and keep `others` alive) until
    `worker_id` shows `state`. Polls slower than half the heartbeat interval, so every beat strikes."""

    def reported() -> bool:
        for other in others:
            coordinator.beat(other, plan_version=0)
        report = pb.PeerReport(peer_id=peer, reason="outlier", count=3)
        coordinator.beat(reporter, plan_version=0, reports=[report])
        return states(coordinator)[worker_id] == state

    wait_for(reported, timeout=20, what=f"{worker_id} to be banned", poll=0.15)


def metric(coordinator: CoordinatorProcess, name: str) -> float:
    url = coordinator.line_matching(r"^metrics: http://").split()[-1]
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))


def token_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "coordinator.app.cli", "token", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.fault("a banned worker restarts after kill -9 to shed its ban")
def test_reported_worker_is_banned_and_stays_banned_after_kill_9(tmp_path: Path) -> None:
    first = CoordinatorProcess(tmp_path / "state", *FAST)
    try:
        reporter, target = first.join(with_peer(PEER_A)), first.join(with_peer(PEER_B))
        bystander = first.join(with_peer(PEER_C))
        assert metric(first, "swarmtrain_banned_workers") == 0
        report_until_state(first, reporter, PEER_B, target.worker_id, pb.WORKER_STATE_BANNED, [target, bystander])
        assert states(first) == {reporter.worker_id: pb.WORKER_STATE_ACTIVE, target.worker_id: pb.WORKER_STATE_BANNED,
                                 bystander.worker_id: pb.WORKER_STATE_ACTIVE}
        swarm = first.swarm()
        assert [s.active_workers for s in swarm.stages] == [2]  # re-planned without it
        message = f"worker {target.worker_id} was banned after 5 outlier reports from 1 peer"
        err = refused(first.beat, target)
        assert (err.code(), err.details()) == (grpc.StatusCode.PERMISSION_DENIED, message)
        assert first.line_matching(rf"^banned worker {target.worker_id} \(peer {PEER_B}\): 5 outlier reports")
        assert metric(first, "swarmtrain_banned_workers") == 1
        first.kill_9()
    finally:
        first.kill()
    second = CoordinatorProcess(tmp_path / "state", *FAST)
    try:
        assert states(second)[target.worker_id] == pb.WORKER_STATE_BANNED
        err = refused(second.beat, target)
        assert (err.code(), err.details()) == (grpc.StatusCode.PERMISSION_DENIED, message)
        err = refused(second.join, with_peer(PEER_B), worker_id=target.worker_id, session_token=target.session_token)
        assert (err.code(), err.details()) == (grpc.StatusCode.PERMISSION_DENIED, message)
        err = refused(second.join, with_peer(PEER_B))  # a fresh worker id with the banned peer id
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.details().startswith(f"peer {PEER_B} belongs to worker {target.worker_id}, which was banned")
        assert second.join(with_peer(PEER_A), worker_id=reporter.worker_id,
                           session_token=reporter.session_token).assignment.stage_index == 0
    finally:
        second.kill()


def test_a_banned_worker_process_exits_with_one_line(coordinator: CoordinatorProcess, workers: Workers) -> None:
    worker = workers.spawn("--coordinator", coordinator.endpoint, "--join-token", TOKEN)
    worker_id = worker.wait_event("assigned")["worker_id"]
    peer = worker_info(coordinator, worker_id).peer_id
    assert peer
    reporter = coordinator.join(make_profile(), join_token=TOKEN)
    report_until_state(coordinator, reporter, peer, worker_id, pb.WORKER_STATE_BANNED)
    exited = worker.wait_exit()
    # the one line the volunteer sees, on purpose: it names the ban and its reason
    assert (exited["code"], exited["message"]) == (
        2, f"error: worker {worker_id} was banned after 5 outlier reports from 1 peer"), exited
    assert "Traceback" not in worker.output


@pytest.mark.fault("a volunteer's join token revoked mid-run")
def test_a_revoked_token_expels_its_worker_and_refuses_new_joins(
    coordinator: CoordinatorProcess, workers: Workers
) -> None:
    state_dir = str(coordinator.state_dir)
    added = token_cli("add", "alice", "--state-dir", state_dir)
    assert added.returncode == 0, added.stderr
    alice = added.stdout.strip()
    worker = workers.spawn("--coordinator", coordinator.endpoint, "--join-token", alice)  # issued while running
    worker_id = worker.wait_event("assigned")["worker_id"]
    static = coordinator.join(make_profile(), join_token=TOKEN)  # the config's token keeps working
    beating = KeepAlive(coordinator, static)  # it beats as a live worker would while alice is revoked
    wait_for(lambda: worker_info(coordinator, worker_id).state == pb.WORKER_STATE_ACTIVE, what="alice's worker")

    revoked = token_cli("revoke", "alice", "--state-dir", state_dir)
    assert revoked.returncode == 0, revoked.stderr
    exited = worker.wait_exit()
    # the lines a volunteer and an operator read, on purpose: their wording is the product here
    assert (exited["code"], exited["message"]) == (
        2, f"error: worker {worker_id} was expelled: join token alice was revoked; "
           "ask the swarm's operator for a new token"), exited
    assert "Traceback" not in worker.output
    assert states(coordinator)[worker_id] == pb.WORKER_STATE_REVOKED
    assert coordinator.line_matching(rf"^join token alice revoked: expelled 1 worker\(s\): {worker_id}$")

    err = refused(coordinator.join, make_profile(), join_token=alice)
    assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED,
                                           "join token alice was revoked: ask the swarm's operator for a new one")
    replies = beating.stop()
    assert replies and set(replies) <= {pb.INSTRUCTION_CONTINUE, pb.INSTRUCTION_REASSIGN}, replies
    listed = token_cli("list", "--state-dir", state_dir)
    assert listed.returncode == 0 and listed.stdout.splitlines()[1].split()[:2] == ["alice", "revoked"]

    # a volunteer who starts again with the revoked token gets one line and exit 2
    again = workers.spawn("--coordinator", coordinator.endpoint, "--join-token", alice)
    exited = again.wait_exit(timeout=60)
    assert (exited["code"], exited["message"]) == (
        2, "error: the coordinator refused the join token: join token alice was revoked: "
           "ask the swarm's operator for a new one"), exited
    assert [line for line in again.lines if line.startswith("error: ")] == [exited["message"]]
    assert "Traceback" not in again.output


def test_token_commands_refuse_bad_input_with_one_line(tmp_path: Path) -> None:
    missing = token_cli("add", "alice", "--state-dir", str(tmp_path / "missing"))
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == [f"error: state dir {tmp_path / 'missing'} does not exist: "
                                           "pass the coordinator's --state-dir"]
    assert token_cli("add", "alice", "--state-dir", str(tmp_path)).returncode == 0
    for args, expected in [(["add", "alice"], "error: a join token named 'alice' already exists"),
                           (["revoke", "bob"], "error: no join token named 'bob'")]:
        result = token_cli(*args, "--state-dir", str(tmp_path))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
