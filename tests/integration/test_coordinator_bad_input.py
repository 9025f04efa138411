"""Every class of bad input gets the right status and a message that says what to fix."""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from protos import swarmtrain_pb2 as pb
from protos import swarmtrain_pb2_grpc as pb_grpc
from tests.harness.coordinator_process import CoordinatorProcess, make_profile

pytestmark = pytest.mark.multiprocess  # a coordinator process

TOKEN = "let-me-in-42"


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    process = CoordinatorProcess(tmp_path_factory.mktemp("bad-input") / "state", "--join-token", TOKEN)
    yield process
    process.kill()


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, timeout=10, **kwargs)
    return caught.value


def profile_with(**fields: object) -> pb.WorkerProfile:
    profile = make_profile()
    for key, value in fields.items():
        if isinstance(value, list):
            getattr(profile, key)[:] = value
        else:
            setattr(profile, key, value)
    return profile


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"memory_bytes": 0}, "profile.memory_bytes: must be > 0 and <= 16 TiB (got 0)"),
        ({"memory_bytes": 2**60}, "profile.memory_bytes: must be > 0 and <= 16 TiB"),
        ({"achieved_flops": -1.0}, "profile.achieved_flops: must be > 0 and <= 1e+17 FLOP/s (got -1)"),
        ({"achieved_flops": math.nan}, "profile.achieved_flops: must be a finite number"),
        ({"achieved_flops": 1e20}, "profile.achieved_flops: must be > 0 and <= 1e+17 FLOP/s"),
        ({"achieved_flops": 9e13}, "exceeds peak_flops"),
        ({"upload_bps": 0.0}, "profile.upload_bps: must be > 0"),
        ({"download_bps": math.inf}, "profile.download_bps: must be a finite number"),
        ({"usd_per_hour": -2.0}, "profile.usd_per_hour: must be >= 0"),
        ({"software_version": ""}, "profile.software_version: is required"),
        ({"software_version": "latest"}, "profile.software_version: must look like 1.2.3"),
        ({"public_name": "x" * 65}, "profile.public_name: is 65 characters long; at most 64"),
        ({"public_name": "evil\x1b[2J"}, "profile.public_name: contains control characters"),
        ({"peer_id": "not a peer id!"}, "profile.peer_id: must be a base58 hivemind peer id"),
        ({"multiaddrs": ["1.2.3.4:80"]}, "profile.multiaddrs[0]: must be a multiaddr"),
        ({"metrics_endpoint": "http://x/metrics"}, "profile.metrics_endpoint: must be host:port"),
        ({"gpu_count": 0}, "profile.gpu_count: is 0 but gpu_name is"),
    ],
)
def test_join_with_a_bad_profile_is_invalid_argument(
    coordinator: CoordinatorProcess, fields: dict[str, object], message: str
) -> None:
    err = rpc_error(coordinator.stub.Join, pb.JoinRequest(profile=profile_with(**fields), join_token=TOKEN))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.details()


def test_join_without_a_profile(coordinator: CoordinatorProcess) -> None:
    err = rpc_error(coordinator.stub.Join, pb.JoinRequest(join_token=TOKEN))
    assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "profile: is required")


@pytest.mark.parametrize(("token", "what"), [("", "no join token"), ("guess", "a wrong join token")])
def test_join_token_is_required(coordinator: CoordinatorProcess, token: str, what: str) -> None:
    err = rpc_error(coordinator.stub.Join, pb.JoinRequest(profile=make_profile(), join_token=token))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.details().startswith(what) and "--join-token" in err.details()


def test_another_release_line_is_refused(coordinator: CoordinatorProcess) -> None:
    err = rpc_error(coordinator.stub.Join, pb.JoinRequest(profile=make_profile(version="99.0.0"), join_token=TOKEN))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "worker runs swarmtrain 99.0.0" in err.details() and "install swarmtrain" in err.details()


def test_identity_errors(coordinator: CoordinatorProcess) -> None:
    good = coordinator.join(join_token=TOKEN)
    beat = coordinator.stub.Heartbeat
    cases = [
        (pb.HeartbeatRequest(session_token="t"), grpc.StatusCode.INVALID_ARGUMENT, "worker_id: is required"),
        (pb.HeartbeatRequest(worker_id="bob", session_token="t"), grpc.StatusCode.INVALID_ARGUMENT,
         "worker_id: must look like"),
        (pb.HeartbeatRequest(worker_id=good.worker_id), grpc.StatusCode.INVALID_ARGUMENT, "session_token: is required"),
        (pb.HeartbeatRequest(worker_id="w-00000000", session_token="t"), grpc.StatusCode.NOT_FOUND,
         "unknown worker w-00000000"),
        (pb.HeartbeatRequest(worker_id=good.worker_id, session_token="stolen"), grpc.StatusCode.UNAUTHENTICATED,
         "wrong session token"),
    ]
    for request, code, message in cases:
        err = rpc_error(beat, request)
        assert err.code() == code, (request, err.details())
        assert message in err.details()
    err = rpc_error(coordinator.stub.Join, pb.JoinRequest(profile=make_profile(), join_token=TOKEN,
                                                          worker_id=good.worker_id, session_token="stolen"))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    err = rpc_error(coordinator.stub.Leave, pb.LeaveRequest(worker_id="w-00000000", session_token="t"))
    assert err.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("counters", "message"),
    [
        (pb.Counters(tokens=10, samples=20), "counters.samples: 20 samples cannot exceed 10 tokens"),
        (pb.Counters(loss_sum=math.nan, loss_count=1), "counters.loss_sum: must be a finite number"),
        (pb.Counters(loss_sum=3.0), "counters.loss_sum: is set but loss_count is 0"),
        (pb.Counters(compute_seconds=-1), "counters.compute_seconds: must be between 0"),
        (pb.Counters(traffic=[pb.TrafficCounter(kind=pb.TRAFFIC_KIND_UNSPECIFIED)]), "counters.traffic[0].kind"),
        (pb.Counters(traffic=[pb.TrafficCounter(kind=1), pb.TrafficCounter(kind=1)]), "appears twice"),
    ],
)
def test_bad_counters_are_refused(coordinator: CoordinatorProcess, counters: pb.Counters, message: str) -> None:
    good = coordinator.join(join_token=TOKEN)
    err = rpc_error(coordinator.stub.Heartbeat, pb.HeartbeatRequest(
        worker_id=good.worker_id, session_token=good.session_token, counters=counters))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.details()


def test_oversized_message_is_refused_and_the_server_lives_on(coordinator: CoordinatorProcess) -> None:
    huge = profile_with(public_name="x" * (1 << 20))
    err = rpc_error(coordinator.stub.Join, pb.JoinRequest(profile=huge, join_token=TOKEN))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert coordinator.swarm().run_id == "tiny"


def test_nothing_bad_reached_the_registry(tmp_path: Path) -> None:
    process = CoordinatorProcess(tmp_path / "state", "--join-token", TOKEN)
    try:
        for fields in ({"memory_bytes": 0}, {"achieved_flops": math.nan}, {"public_name": "\x00"}):
            rpc_error(process.stub.Join, pb.JoinRequest(profile=profile_with(**fields), join_token=TOKEN))
        rpc_error(process.stub.Join, pb.JoinRequest(profile=make_profile()))
        assert len(process.swarm().workers) == 0
    finally:
        process.kill()


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    process = CoordinatorProcess(tmp_path / "state", "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        port = process.endpoint.rsplit(":", 1)[1]
        with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
            swarm = pb_grpc.CoordinatorStub(channel).GetSwarm(pb.GetSwarmRequest(), timeout=10)
        assert swarm.run_id == "tiny"
        # plaintext against a TLS port fails rather than leaking anything
        with pytest.raises(grpc.RpcError):
            process.swarm()
    finally:
        process.kill()


def test_joins_from_one_address_are_rate_limited_with_a_clear_status(tmp_path: Path) -> None:
    process = CoordinatorProcess(tmp_path / "limited", "--set", "coordinator.join_rate_per_address=0.5",
                                 "--set", "coordinator.join_burst_per_address=3")
    try:
        for _ in range(3):  # the burst
            process.join()
        err = rpc_error(process.stub.Join, pb.JoinRequest(profile=make_profile()))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert re.fullmatch(r"too many joins from 127\.0\.0\.1: retry in \d+\.\ds", err.details()), err.details()
        process.stub.GetSwarm(pb.GetSwarmRequest(), timeout=10)  # other calls are not limited
    finally:
        process.kill()
