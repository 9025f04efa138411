"""Hostile input to a live coordinator: random bytes and random field values on every RPC,
the streaming checkpoint RPCs included.

Each call must end in a status a client can act on (never UNKNOWN, never a hang), and the
coordinator must serve normally afterwards. The number of inputs tried is printed.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import swarmtrain_pb2 as pb
from tests.harness.coordinator_process import CoordinatorProcess

pytestmark = pytest.mark.multiprocess  # a coordinator process

METHODS = ["Join", "Heartbeat", "Leave", "GetSwarm"]
# what a malformed request may be answered with: a refusal that says why, or garbage bytes the
# gRPC runtime could not even parse (INTERNAL "Exception deserializing request")
CLEAR = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED,
         grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
         grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.PERMISSION_DENIED}
TRIED = {"count": 0}

numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**31), 2**31 - 1).map(float))
texts = st.text(max_size=300)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    process = CoordinatorProcess(tmp_path_factory.mktemp("fuzz") / "state")
    yield process
    process.kill()
    print(f"\nfuzz: {TRIED['count']:,} inputs tried")


def raw_call(process: CoordinatorProcess, method: str, body: bytes) -> grpc.StatusCode:
    call = process.channel.unary_unary(f"/swarmtrain.v1.Coordinator/{method}")
    TRIED["count"] += 1
    try:
        call(body, timeout=10)
    except grpc.RpcError as err:
        return check_status(method, body, err)
    return grpc.StatusCode.OK


def check_status(method: str, body: bytes, err: grpc.RpcError) -> grpc.StatusCode:
    code = err.code()
    assert code in CLEAR or (code == grpc.StatusCode.INTERNAL and "deserializ" in (err.details() or "")), (
        method, body[:64], code, err.details())
    assert err.details(), (method, code)  # a status always says why
    return code


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(st.binary(max_size=4096), min_size=0, max_size=4))
def test_random_checkpoint_uploads_get_a_clear_status(coordinator: CoordinatorProcess, messages: list[bytes]) -> None:
    call = coordinator.channel.stream_unary("/swarmtrain.v1.Coordinator/SaveCheckpoint")
    TRIED["count"] += 1
    with pytest.raises(grpc.RpcError) as err:  # nobody here was asked for a checkpoint
        call(iter(messages), timeout=10)
    check_status("SaveCheckpoint", b"".join(messages), err.value)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(worker=texts, token=texts, start=st.integers(0, 2**32 - 1), end=st.integers(0, 2**32 - 1),
       size=st.integers(0, 2**64 - 1), data=st.binary(max_size=2048))
def test_random_checkpoint_headers_and_loads_get_a_clear_status(coordinator: CoordinatorProcess, worker: str,
                                                                token: str, start: int, end: int, size: int,
                                                                data: bytes) -> None:
    header = pb.CheckpointFile(worker_id=worker, session_token=token, checkpoint_id=size % 7, layer_start=start,
                               layer_end=end, size_bytes=size, sha256=token)
    upload = coordinator.channel.stream_unary("/swarmtrain.v1.Coordinator/SaveCheckpoint")
    load = coordinator.channel.unary_stream("/swarmtrain.v1.Coordinator/LoadCheckpoint")
    TRIED["count"] += 2
    with pytest.raises(grpc.RpcError) as err:
        upload(iter([pb.CheckpointChunk(file=header, data=data).SerializeToString()]), timeout=10)
    check_status("SaveCheckpoint", data, err.value)
    request = pb.LoadCheckpointRequest(worker_id=worker, session_token=token, layer_start=start, layer_end=end)
    with pytest.raises(grpc.RpcError) as err:
        list(load(request.SerializeToString(), timeout=10))
    check_status("LoadCheckpoint", data, err.value)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(METHODS), body=st.binary(max_size=4096))
def test_random_bytes_get_a_clear_status(coordinator: CoordinatorProcess, method: str, body: bytes) -> None:
    raw_call(coordinator, method, body)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=texts, gpu=texts, version=texts, memory=st.integers(0, 2**64 - 1), flops=numbers, peak=numbers,
       up=numbers, down=numbers, price=numbers, count=st.integers(0, 2**32 - 1),
       peer=texts, addrs=st.lists(texts, max_size=20), metrics=texts, token=texts, run=texts)
def test_random_join_profiles_get_a_clear_status(coordinator: CoordinatorProcess, name: str, gpu: str,
                                                 version: str, memory: int, flops: float, peak: float, up: float,
                                                 down: float, price: float, count: int, peer: str,
                                                 addrs: list[str], metrics: str, token: str, run: str) -> None:
    profile = pb.WorkerProfile(software_version=version, gpu_name=gpu, gpu_count=count, memory_bytes=memory,
                               achieved_flops=flops, peak_flops=peak, upload_bps=up, download_bps=down,
                               usd_per_hour=price, public_name=name, peer_id=peer, multiaddrs=addrs,
                               metrics_endpoint=metrics)
    request = pb.JoinRequest(profile=profile, join_token=token, worker_id=run, session_token=token)
    raw_call(coordinator, "Join", request.SerializeToString())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(worker=texts, token=texts, version=st.integers(0, 2**64 - 1), tokens=st.integers(0, 2**64 - 1),
       loss=numbers, count=st.integers(0, 2**64 - 1), seconds=numbers, step=st.integers(0, 2**64 - 1),
       kinds=st.lists(st.integers(-5, 10), max_size=5))
def test_random_heartbeats_and_leaves_get_a_clear_status(coordinator: CoordinatorProcess, worker: str, token: str,
                                                         version: int, tokens: int, loss: float, count: int,
                                                         seconds: float, step: int, kinds: list[int]) -> None:
    traffic = [pb.TrafficCounter(kind=k, sent_bytes=tokens) for k in kinds]
    counters = pb.Counters(tokens=tokens, loss_sum=loss, loss_count=count, compute_seconds=seconds,
                           wait_seconds=seconds, local_step=step, traffic=traffic)
    beat = pb.HeartbeatRequest(worker_id=worker, session_token=token, plan_version=version, counters=counters)
    raw_call(coordinator, "Heartbeat", beat.SerializeToString())
    raw_call(coordinator, "Leave", pb.LeaveRequest(worker_id=worker, session_token=token).SerializeToString())


def test_oversized_messages_are_refused_and_the_coordinator_still_serves(coordinator: CoordinatorProcess) -> None:
    for method in METHODS:
        TRIED["count"] += 1
        with pytest.raises(grpc.RpcError) as caught:
            coordinator.channel.unary_unary(f"/swarmtrain.v1.Coordinator/{method}")(b"\x0a" * (300 * 1024), timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    joined = coordinator.join()  # after everything above, a well-formed worker still gets in
    assert joined.worker_id and coordinator.swarm().run_id
