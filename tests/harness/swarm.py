"""What tests of a running swarm share: its pace, ports, the coordinator's view of a worker,
the replicas' averaging rounds read from their traces, and peer identities in a known order."""

from __future__ import annotations

import socket
from pathlib import Path

from hivemind.p2p import P2P, PeerID

from protos import swarmtrain_pb2 as pb
from tests.harness.coordinator_process import CoordinatorProcess, wait_for
from worker.telemetry.trace import read_trace

# heartbeats every half second, a worker gone after 5 s of silence, leases that ride out a restart,
# and a token budget no test reaches unless it sets its own: a run that ends (tiny's 1M tokens take
# ~90 s) would send workers home before slower events a test waits for (a ban, a leader's return)
TRAINING_PACE = ["--set", "coordinator.heartbeat_interval_s=0.5", "--set", "coordinator.heartbeat_timeout_s=5",
                 "--set", "coordinator.lease_s=30", "--set", "training.total_tokens=1000000000"]


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


def agreed_rounds(traces: list[Path], stage: int) -> dict[str, set[str]]:
    """Round id -> the parameter digests its participants ended with, for rounds of `stage` that
    two or more replicas wrote (its leader and a follower). Stages are read from the events, not
    from where a worker is now: a re-plan may have moved it since."""
    digests: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    for path in traces:
        for event in read_trace(path) if path.exists() else []:
            if event["event"] == "sync" and event["stage"] == stage and (event["agreed"] > 1 or not event["leader"]):
                digests.setdefault(event["round"], set()).add(event["digest"])
                counts[event["round"]] = counts.get(event["round"], 0) + 1
    return {r: d for r, d in digests.items() if counts[r] >= 2}


def identities(folder: Path, n: int) -> list[Path]:
    """`n` peer key files, sorted by the peer id they give: the replica with the lowest id leads
    its stage's rounds, so a worker given the last one is always a follower, and one given the
    first leads."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"peer{i}.key" for i in range(n)]
    for path in paths:
        P2P.generate_identity(str(path))
    return sorted(paths, key=lambda p: PeerID.from_identity(p.read_bytes()).to_base58())
