"""A real coordinator process on free ports, driven by real gRPC clients."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import swarmtrain_pb2 as pb
from tests.harness.coordinator_process import CoordinatorProcess, make_profile, wait_for

pytestmark = pytest.mark.multiprocess  # coordinator processes

# tiny trains in ~14 MB; 9 MB workers cannot hold it whole, so the plan must pipeline it.
SMALL_WORKER = 40 * 2**20  # a GPU of 40 MiB: tiny peaks at ~44 MiB whole, ~35 MiB per half
FAST = ["--set", "coordinator.heartbeat_interval_s=0.2", "--set", "coordinator.heartbeat_timeout_s=1.5"]


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[CoordinatorProcess]:
    process = CoordinatorProcess(tmp_path / "state", *FAST)
    yield process
    process.kill()


def stages_served(swarm: pb.GetSwarmResponse) -> list[int]:
    return [s.active_workers for s in swarm.stages]


def test_join_assigns_a_stage_and_getswarm_shows_it(coordinator: CoordinatorProcess) -> None:
    joined = coordinator.join(make_profile(name="alice"))
    assert joined.worker_id.startswith("w-") and len(joined.session_token) >= 24
    a = joined.assignment
    assert (a.stage_index, a.num_stages, a.layer_start, a.layer_end) == (0, 1, 0, 4)
    assert a.config_hash and a.lease_expires_unix > 0 and a.averaging_group
    assert a.activation_compression.codec != pb.CODEC_UNSPECIFIED
    assert (a.data_shard_index, a.data_shard_count) == (0, 1)
    run = json.loads(joined.run_config_json)
    assert run["model"]["n_layer"] == 4 and "join_token" not in run["coordinator"]
    swarm = coordinator.swarm()
    assert [w.public_name for w in swarm.workers] == ["alice"]
    assert swarm.workers[0].state == pb.WORKER_STATE_ACTIVE


def test_health_and_reflection(coordinator: CoordinatorProcess) -> None:
    health = health_pb2_grpc.HealthStub(coordinator.channel)
    for service in ("", "swarmtrain.v1.Coordinator"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(coordinator.channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert "swarmtrain.v1.Coordinator" in names


def test_small_workers_get_a_pipeline_with_every_stage_served(coordinator: CoordinatorProcess) -> None:
    joined = [coordinator.join(make_profile(memory_bytes=SMALL_WORKER)) for _ in range(4)]
    swarm = coordinator.swarm()
    assert len(swarm.stages) >= 2
    assert all(n >= 2 for n in stages_served(swarm)), stages_served(swarm)
    # each worker learns its current assignment through a heartbeat
    spans = set()
    for j in joined:
        reply = coordinator.beat(j, plan_version=0)
        assert reply.instruction == pb.INSTRUCTION_REASSIGN
        spans.add((reply.assignment.layer_start, reply.assignment.layer_end))
        assert list(reply.assignment.stage_boundaries) == [0] + [s.layer_end for s in swarm.stages]
    assert len(spans) == len(swarm.stages)
    first = [coordinator.beat(j, plan_version=0).assignment for j in joined]
    shards = sorted((a.data_shard_index, a.data_shard_count) for a in first if a.stage_index == 0)
    assert shards == [(i, len(shards)) for i in range(len(shards))]


def test_heartbeat_counts_progress_and_renews_the_lease(coordinator: CoordinatorProcess) -> None:
    joined = coordinator.join()
    reply = coordinator.beat(joined, tokens=4096, samples=32, loss_sum=2.5, loss_count=1, compute_seconds=1.0)
    assert reply.instruction == pb.INSTRUCTION_CONTINUE
    assert reply.lease_expires_unix >= joined.assignment.lease_expires_unix
    swarm = coordinator.swarm()
    assert swarm.progress.trained_tokens == 4096  # single stage: it is the last stage
    assert swarm.progress.last_loss == pytest.approx(2.5)


def test_silent_worker_times_out_and_its_stage_is_replanned(coordinator: CoordinatorProcess) -> None:
    joined = [coordinator.join(make_profile(memory_bytes=SMALL_WORKER)) for _ in range(4)]
    before = coordinator.swarm()
    silent, talkers = joined[0], joined[1:]

    def silent_is_gone() -> bool:
        for j in talkers:
            coordinator.beat(j, plan_version=0)
        states = {w.worker_id: w.state for w in coordinator.swarm().workers}
        return states[silent.worker_id] == pb.WORKER_STATE_GONE

    wait_for(silent_is_gone, timeout=15, what="the silent worker to be marked gone", poll=0.2)
    after = coordinator.swarm()
    assert after.plan_version > before.plan_version
    assert all(n >= 1 for n in stages_served(after)), stages_served(after)
    with pytest.raises(grpc.RpcError) as caught:
        coordinator.beat(silent)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "call Join with its id and token" in caught.value.details()


def test_leave_replans_at_once(coordinator: CoordinatorProcess) -> None:
    a, b = coordinator.join(), coordinator.join()
    version = coordinator.swarm().plan_version
    coordinator.stub.Leave(pb.LeaveRequest(worker_id=a.worker_id, session_token=a.session_token, reason="bye"))
    swarm = coordinator.swarm()
    states = {w.worker_id: w.state for w in swarm.workers}
    assert states == {a.worker_id: pb.WORKER_STATE_LEFT, b.worker_id: pb.WORKER_STATE_ACTIVE}
    assert swarm.plan_version > version
    assert stages_served(swarm) == [1]
    # a retried Leave is harmless
    coordinator.stub.Leave(pb.LeaveRequest(worker_id=a.worker_id, session_token=a.session_token))


def test_kill_9_and_restart_keeps_ids_and_stages(tmp_path: Path) -> None:
    first = CoordinatorProcess(tmp_path / "state", *FAST)
    try:
        joined = [first.join(make_profile(memory_bytes=SMALL_WORKER)) for _ in range(4)]
        stage_of = {w.worker_id: w.stage_index for w in first.swarm().workers}
        first.beat(joined[0], tokens=1000, samples=8)
        first.kill_9()
    finally:
        first.kill()
    second = CoordinatorProcess(tmp_path / "state", *FAST)
    try:
        swarm = second.swarm()
        assert {w.worker_id: w.stage_index for w in swarm.workers} == stage_of
        for j in joined:
            again = second.join(make_profile(memory_bytes=SMALL_WORKER),
                                worker_id=j.worker_id, session_token=j.session_token)
            assert again.worker_id == j.worker_id
            assert again.assignment.stage_index == stage_of[j.worker_id]
        assert len(second.swarm().workers) == 4  # re-registering made no duplicates
    finally:
        second.kill()


def dht_peer_id(process: CoordinatorProcess) -> str:
    addrs = process.line_matching(r"^DHT: ").split()[1:]
    ids = {a.rsplit("/p2p/", 1)[1] for a in addrs}
    assert len(ids) == 1, addrs
    return ids.pop()


def test_a_restarted_coordinator_keeps_its_dht_peer_id(tmp_path: Path) -> None:
    # the `--peers` multiaddr volunteers were given (a fixed --dht-port) still reaches it
    first = CoordinatorProcess(tmp_path / "state")
    try:
        before = dht_peer_id(first)
        assert first.terminate() == 0
    finally:
        first.kill()
    second = CoordinatorProcess(tmp_path / "state")
    try:
        assert dht_peer_id(second) == before
    finally:
        second.kill()
    other = CoordinatorProcess(tmp_path / "other-state")  # another state dir: another peer
    try:
        assert dht_peer_id(other) != before
    finally:
        other.kill()


def test_a_dht_key_that_is_not_a_key_is_refused_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    state = tmp_path / "state"
    state.mkdir()
    (state / "dht.key").write_text("not a key\n")
    result = subprocess.run(
        [sys.executable, "-m", "coordinator.app.cli", "--config", "tiny", "--grpc-port", "0", "--dht-port", "0",
         "--metrics-port", "0", "--state-dir", str(state)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "state error:" in result.stderr and "is not a peer key file: move it away" in result.stderr
    assert "Traceback" not in result.stderr
    assert (state / "dht.key").read_text() == "not a key\n"


def test_sigterm_drains_and_exits_cleanly(tmp_path: Path) -> None:
    process = CoordinatorProcess(tmp_path / "state")
    try:
        process.join()
        assert process.terminate() == 0
        assert "registry saved" in process.output  # the operator's word that nothing was lost, on purpose
    finally:
        process.kill()


def test_a_state_dir_of_another_run_is_refused(tmp_path: Path) -> None:
    CoordinatorProcess(tmp_path / "state").terminate()
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "coordinator.app.cli", "--config", "tiny", "--set", "model.n_layer=6",
         "--grpc-port", "0", "--dht-port", "0", "--metrics-port", "0", "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "state error:" in result.stderr and "use another --state-dir" in result.stderr
    assert "Traceback" not in result.stderr


def test_rendezvous_record_is_found_through_the_dht(coordinator: CoordinatorProcess) -> None:
    import hivemind

    from protos.rendezvous import find_coordinators

    maddrs = coordinator.line_matching(r"^DHT: ").split()[1:]
    client = hivemind.DHT(initial_peers=maddrs, start=True, client_mode=True)
    try:
        # one well-known key lists every run; the run id is the subkey
        found = wait_for(lambda: find_coordinators(client), what="the rendezvous record")
        assert list(found) == ["tiny"]
        record = found["tiny"]
        assert record.endpoint == coordinator.endpoint
        assert record.config_hash == coordinator.swarm().config_hash
    finally:
        client.shutdown()
    # the command volunteers copy, on purpose: the tiny preset trains in fp32, on CPUs
    assert "worker --cpu --peers /ip4/" in coordinator.output


@pytest.mark.parametrize("flag", ["--grpc-port", "--metrics-port", "--dht-port"])
def test_a_busy_port_is_one_line_naming_the_flag(tmp_path: Path, flag: str) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = {"--grpc-port": "0", "--metrics-port": "0", "--dht-port": "0", flag: str(busy.getsockname()[1])}
        result = subprocess.run(
            [sys.executable, "-m", "coordinator.app.cli", "--config", "tiny", "--host", "127.0.0.1",
             "--state-dir", str(tmp_path / "state"), *(x for kv in ports.items() for x in kv)],
            capture_output=True, text=True, timeout=90, start_new_session=True,
        )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"pick another {flag}" in errors[0].replace("with ", ""), result.stderr
