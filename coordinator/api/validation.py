"""Checks on every field a worker sends, before anything reaches the registry (pure).

Each check returns a message that names the field, what is wrong and what a sane value
looks like; the service answers the first one with INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
import re

from coordinator.swarm.refusal import InvalidRequest
from protos import swarmtrain_pb2 as pb

# Bounds well past any real machine, so only nonsense is refused.
MAX_MEMORY_BYTES = 16 * 2**40  # 16 TiB: a whole 8-GPU node with room to spare
MAX_FLOPS = 1e17  # 100 PFLOP/s: ~50 H100s' dense bf16 in one worker
MAX_LINK_BPS = 1e12  # 1 Tbit/s
MAX_USD_PER_HOUR = 1000.0
MAX_GPU_COUNT = 64
MAX_TOKENS_PER_BEAT = 10**12
MAX_SECONDS_PER_BEAT = 86400.0
MAX_TEXT = 256
MAX_MULTIADDRS = 16
MAX_REPORTS = 64
MAX_REPORT_COUNT = 1_000_000
REPORT_REASONS = ("non_finite", "malformed", "unauthorized", "outlier")

_WORKER_ID = re.compile(r"^w-[0-9a-f]{8,32}$")
_VERSION = re.compile(r"^\d+\.\d+\.\d+([.+-][0-9A-Za-z.+-]*)?$")
_PEER_ID = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{20,128}$")  # base58
_ENDPOINT = re.compile(r"^[A-Za-z0-9.\-\[\]:]{1,253}:\d{1,5}$")


def _bad(field: str, message: str) -> InvalidRequest:
    return InvalidRequest("INVALID_ARGUMENT", f"{field}: {message}")


def _number(field: str, value: float, low: float, high: float, unit: str, *, allow_zero: bool = False) -> None:
    if not math.isfinite(value):
        raise _bad(field, f"must be a finite number (got {value})")
    if value == 0 and allow_zero:
        return
    if value <= low or value > high:
        lower = ">= 0" if allow_zero else f"> {low:g}"
        raise _bad(field, f"must be {lower} and <= {high:g} {unit} (got {value:g})")


def _text(field: str, value: str, *, required: bool = False, limit: int = MAX_TEXT) -> None:
    if required and not value:
        raise _bad(field, "is required")
    if len(value) > limit:
        raise _bad(field, f"is {len(value)} characters long; at most {limit}")
    if any(not ch.isprintable() for ch in value):
        raise _bad(field, "contains control characters")


def validate_profile(profile: pb.WorkerProfile) -> None:
    p = "profile"
    _text(f"{p}.software_version", profile.software_version, required=True, limit=64)
    if not _VERSION.match(profile.software_version):
        raise _bad(f"{p}.software_version", f"must look like 1.2.3 (got {profile.software_version!r})")
    _text(f"{p}.gpu_name", profile.gpu_name, limit=128)
    if profile.gpu_count > MAX_GPU_COUNT:
        raise _bad(f"{p}.gpu_count", f"must be <= {MAX_GPU_COUNT} (got {profile.gpu_count})")
    if profile.gpu_name and profile.gpu_count == 0:
        raise _bad(f"{p}.gpu_count", f"is 0 but gpu_name is {profile.gpu_name!r}: report 1 or more")
    if profile.memory_bytes == 0 or profile.memory_bytes > MAX_MEMORY_BYTES:
        raise _bad(f"{p}.memory_bytes", f"must be > 0 and <= 16 TiB (got {profile.memory_bytes})")
    _number(f"{p}.achieved_flops", profile.achieved_flops, 0, MAX_FLOPS, "FLOP/s")
    _number(f"{p}.peak_flops", profile.peak_flops, 0, MAX_FLOPS, "FLOP/s", allow_zero=True)
    if profile.peak_flops and profile.achieved_flops > 1.05 * profile.peak_flops:
        raise _bad(
            f"{p}.achieved_flops",
            f"{profile.achieved_flops:.3g} FLOP/s exceeds peak_flops {profile.peak_flops:.3g}: re-run the benchmark",
        )
    _number(f"{p}.upload_bps", profile.upload_bps, 0, MAX_LINK_BPS, "bit/s")
    _number(f"{p}.download_bps", profile.download_bps, 0, MAX_LINK_BPS, "bit/s")
    _number(f"{p}.usd_per_hour", profile.usd_per_hour, 0, MAX_USD_PER_HOUR, "$/h", allow_zero=True)
    _text(f"{p}.public_name", profile.public_name, limit=64)
    if profile.peer_id and not _PEER_ID.match(profile.peer_id):
        raise _bad(f"{p}.peer_id", "must be a base58 hivemind peer id")
    if len(profile.multiaddrs) > MAX_MULTIADDRS:
        raise _bad(f"{p}.multiaddrs", f"has {len(profile.multiaddrs)} entries; at most {MAX_MULTIADDRS}")
    for i, addr in enumerate(profile.multiaddrs):
        _text(f"{p}.multiaddrs[{i}]", addr, required=True)
        if not addr.startswith("/"):
            raise _bad(f"{p}.multiaddrs[{i}]", f"must be a multiaddr such as /ip4/1.2.3.4/tcp/4001 (got {addr!r})")
    if profile.metrics_endpoint and not _ENDPOINT.match(profile.metrics_endpoint):
        raise _bad(f"{p}.metrics_endpoint", f"must be host:port (got {profile.metrics_endpoint!r})")


def validate_identity(worker_id: str, session_token: str) -> None:
    if not worker_id:
        raise _bad("worker_id", "is required: use the id Join returned")
    if not _WORKER_ID.match(worker_id):
        raise _bad("worker_id", f"must look like w-1a2b3c4d (got {worker_id[:40]!r})")
    if not session_token:
        raise _bad("session_token", "is required: use the token Join returned")
    _text("session_token", session_token, limit=128)


def validate_join(request: pb.JoinRequest) -> None:
    if not request.HasField("profile"):
        raise _bad("profile", "is required")
    validate_profile(request.profile)
    _text("join_token", request.join_token, limit=256)
    if request.worker_id or request.session_token:
        validate_identity(request.worker_id, request.session_token)


def validate_counters(counters: pb.Counters) -> None:
    c = "counters"
    if counters.tokens > MAX_TOKENS_PER_BEAT:
        raise _bad(f"{c}.tokens", f"{counters.tokens} tokens in one heartbeat is not plausible")
    if counters.samples > counters.tokens:
        raise _bad(f"{c}.samples", f"{counters.samples} samples cannot exceed {counters.tokens} tokens")
    if not math.isfinite(counters.loss_sum) or counters.loss_sum < 0:
        raise _bad(f"{c}.loss_sum", f"must be a finite number >= 0 (got {counters.loss_sum})")
    if counters.loss_count == 0 and counters.loss_sum != 0:
        raise _bad(f"{c}.loss_sum", "is set but loss_count is 0")
    for name in ("compute_seconds", "wait_seconds"):
        value = getattr(counters, name)
        if not math.isfinite(value) or value < 0 or value > MAX_SECONDS_PER_BEAT:
            raise _bad(f"{c}.{name}", f"must be between 0 and {MAX_SECONDS_PER_BEAT:g} (got {value})")
    seen = set()
    for i, t in enumerate(counters.traffic):
        if t.kind == pb.TRAFFIC_KIND_UNSPECIFIED or t.kind not in pb.TrafficKind.values():
            raise _bad(f"{c}.traffic[{i}].kind", "must be ACTIVATIONS, GRADIENTS or STATE")
        if t.kind in seen:
            raise _bad(f"{c}.traffic[{i}].kind", f"{pb.TrafficKind.Name(t.kind)} appears twice")
        seen.add(t.kind)
    if len(counters.reports) > MAX_REPORTS:
        raise _bad(f"{c}.reports", f"at most {MAX_REPORTS} per heartbeat (got {len(counters.reports)})")
    for i, r in enumerate(counters.reports):
        _text(f"{c}.reports[{i}].peer_id", r.peer_id, required=True, limit=128)
        if r.reason not in REPORT_REASONS:
            raise _bad(f"{c}.reports[{i}].reason", f"must be one of {', '.join(REPORT_REASONS)}")
        if not 1 <= r.count <= MAX_REPORT_COUNT:
            raise _bad(f"{c}.reports[{i}].count", f"must be 1..{MAX_REPORT_COUNT} (got {r.count})")


def validate_heartbeat(request: pb.HeartbeatRequest) -> None:
    validate_identity(request.worker_id, request.session_token)
    validate_counters(request.counters)


def validate_leave(request: pb.LeaveRequest) -> None:
    validate_identity(request.worker_id, request.session_token)
    _text("reason", request.reason, limit=MAX_TEXT)
