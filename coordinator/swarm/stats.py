"""What heartbeats tell the coordinator beyond the registry's counters, kept in memory (a restart
resets them, as Prometheus counters may): measured compute rates, traffic by kind, refused-peer
reports, whether each worker serves its stage's state, and the swarm's recent throughput.

Plain state fed by the orchestrator, which passes the clock in; no I/O. The exporters
(coordinator/api/metrics.py, GetSwarm) read it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from protos import swarmtrain_pb2 as pb

MEASURED_RATE_WEIGHT = 0.3  # EMA weight of the newest heartbeat's measured compute rate
RATE_WINDOW_S = 60.0  # the measured swarm throughput is averaged over about this long


@dataclass
class MeasuredRates:
    """Each worker's compute tokens/s as its heartbeats measure it (an EMA), and how many did."""

    rate: dict[str, float] = field(default_factory=dict)
    measurements: dict[str, int] = field(default_factory=dict)

    def note(self, worker_id: str, counters: pb.Counters) -> None:
        if counters.tokens and counters.compute_seconds > 0:
            rate = counters.tokens / counters.compute_seconds
            old = self.rate.get(worker_id)
            self.rate[worker_id] = rate if old is None else old + MEASURED_RATE_WEIGHT * (rate - old)
            self.measurements[worker_id] = self.measurements.get(worker_id, 0) + 1


@dataclass
class PeerReportTally:
    """Messages workers refused from other peers, by reason and by the peer reported."""

    by_reason: dict[str, int] = field(default_factory=dict)
    by_peer: dict[str, int] = field(default_factory=dict)

    def add(self, report: pb.PeerReport) -> int:
        """Count `report`; returns the peer's count before it."""
        self.by_reason[report.reason] = self.by_reason.get(report.reason, 0) + report.count
        before = self.by_peer.get(report.peer_id, 0)
        self.by_peer[report.peer_id] = before + report.count
        return before


def add_traffic(totals: dict[int, pb.TrafficCounter], reported: Sequence[pb.TrafficCounter]) -> None:
    """Add a heartbeat's bytes by kind to the swarm's totals."""
    for counter in reported:
        total = totals.setdefault(counter.kind, pb.TrafficCounter(kind=counter.kind))
        total.sent_bytes += counter.sent_bytes
        total.received_bytes += counter.received_bytes
        total.uncompressed_bytes += counter.uncompressed_bytes


@dataclass
class ServingState:
    """Whether each worker serves its stage's state, per its last heartbeat (`Counters.serves_state`
    is absolute). A worker given another stage or layer span restarts its role: it serves nothing
    until a heartbeat sent under that assignment says so; beats from before it count for the old role."""

    serving: dict[str, bool] = field(default_factory=dict)
    role_version: dict[str, int] = field(default_factory=dict)  # plan version of its current role

    def note(self, worker_id: str, plan_version: int, serves_state: bool) -> None:
        self.serving[worker_id] = serves_state and plan_version >= self.role_version.get(worker_id, 0)

    def restart(self, worker_id: str, plan_version: int) -> None:
        self.serving[worker_id] = False
        self.role_version[worker_id] = plan_version

    def serves(self, worker_id: str) -> bool:
        return self.serving.get(worker_id, False)


@dataclass
class Throughput:
    """Trained tokens per second over the last RATE_WINDOW_S of samples (one per sweep)."""

    samples: deque[tuple[float, int]] = field(default_factory=deque)  # (time, trained tokens)

    def sample(self, now: float, trained_tokens: int) -> None:
        self.samples.append((now, trained_tokens))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW_S:
            self.samples.popleft()

    def rate(self, now: float, trained_tokens: int) -> float:
        """0 before the first sample."""
        if not self.samples:
            return 0.0
        then, tokens = self.samples[0]
        seconds = now - then
        return (trained_tokens - tokens) / seconds if seconds > 0 else 0.0
