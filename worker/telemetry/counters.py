"""What the worker did since the last heartbeat: tokens, seconds, losses, traffic by kind, peer reports."""

from __future__ import annotations

import math
import threading

from protos import swarmtrain_pb2 as pb
from worker.data.leases import DataLeases


class CounterBook:
    """What the worker did since the last heartbeat. The training loop adds from its thread;
    the heartbeat loop takes deltas. A delta that could not be sent is put back.

    It also holds the token grant of the run's budget (coordinator/swarm/budget.py): a heartbeat
    reply says how many more tokens stage 0 may drive, counted from the tokens that heartbeat
    reported, and the driver asks `may_drive` before each step. Until a first grant, nothing limits it.
    And, on prepared data, the data ranges the coordinator handed stage 0 (`data_leases`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tally = pb.Counters()
        self._totals = pb.Counters()  # everything ever added: what the worker's /metrics shows
        self.last_loss = math.nan
        self._serves_state = False  # absolute: stamped on every delta
        self._reported_tokens = 0  # the totals' tokens as of the last delta taken
        self._token_limit: int | None = None  # the totals' tokens the grant allows; None: no grant yet
        self.data_leases = DataLeases()

    def add_work(self, *, tokens: int = 0, samples: int = 0,
                 compute_s: float = 0.0, wait_s: float = 0.0) -> None:
        if min(tokens, samples, compute_s, wait_s) < 0:
            raise ValueError("counters only grow: tokens, samples and seconds must be >= 0")
        self._add(pb.Counters(tokens=tokens, samples=samples, compute_seconds=compute_s, wait_seconds=wait_s))

    def add_loss(self, loss_sum: float, count: int = 1) -> None:
        """`loss_sum`: the sum of `count` per-microbatch mean losses (last stage only)."""
        if not math.isfinite(loss_sum) or loss_sum < 0 or count < 1:
            raise ValueError(
                f"a loss must be finite and >= 0 over >= 1 microbatch (got {loss_sum} over {count})")
        self._add(pb.Counters(loss_sum=loss_sum, loss_count=count))
        self.last_loss = loss_sum / count

    def add_traffic(self, kind: int, *, sent: int = 0, received: int = 0, uncompressed: int = 0) -> None:
        if kind == pb.TRAFFIC_KIND_UNSPECIFIED or kind not in pb.TrafficKind.values():
            raise ValueError(f"unknown traffic kind {kind}")
        traffic = pb.TrafficCounter(kind=kind, sent_bytes=sent, received_bytes=received,
                                    uncompressed_bytes=uncompressed)
        self._add(pb.Counters(traffic=[traffic]))

    def report_peer(self, peer_id: str, reason: str) -> None:
        """A peer whose message this worker refused (the coordinator tallies them)."""
        self._add(pb.Counters(reports=[pb.PeerReport(peer_id=peer_id, reason=reason, count=1)]))

    def set_serves_state(self, serving: bool) -> None:
        """Whether our stage serves its state now; the coordinator tells joining replicas."""
        with self._lock:
            self._serves_state = serving

    def set_local_step(self, step: int) -> None:
        self._add(pb.Counters(local_step=step))

    def take_delta(self) -> pb.Counters:
        """Everything added since the last call; the book starts over (local_step stays)."""
        with self._lock:
            delta, self._tally = self._tally, pb.Counters(local_step=self._tally.local_step)
            delta.serves_state = self._serves_state
            self._reported_tokens = self._totals.tokens
        return delta

    def restore(self, delta: pb.Counters) -> None:
        """Put back a delta the coordinator never acknowledged, so its work is not lost."""
        with self._lock:
            merge_counters(self._tally, delta)  # counted in the totals when it was first added
            self._reported_tokens -= delta.tokens

    def grant_tokens(self, tokens_left: int) -> None:
        """The reply to the last delta: this many tokens more than that delta brought the total to."""
        with self._lock:
            self._token_limit = self._reported_tokens + tokens_left

    def may_drive(self, tokens: int) -> bool:
        """Whether a step of `tokens` more stays within the grant."""
        with self._lock:
            return self._token_limit is None or self._totals.tokens + tokens <= self._token_limit

    def totals(self) -> pb.Counters:
        """Everything added since the worker started (a copy)."""
        with self._lock:
            return pb.Counters.FromString(self._totals.SerializeToString())

    def _add(self, delta: pb.Counters) -> None:
        with self._lock:
            merge_counters(self._tally, delta)
            merge_counters(self._totals, delta)


def merge_counters(into: pb.Counters, delta: pb.Counters) -> None:
    """Add `delta` to `into` in place; local_step is absolute, so the larger one wins (pure)."""
    into.tokens += delta.tokens
    into.samples += delta.samples
    into.loss_sum += delta.loss_sum
    into.loss_count += delta.loss_count
    into.compute_seconds += delta.compute_seconds
    into.wait_seconds += delta.wait_seconds
    into.local_step = max(into.local_step, delta.local_step)
    for report in delta.reports:
        same = next((r for r in into.reports if r.peer_id == report.peer_id and r.reason == report.reason), None)
        if same is not None:
            same.count += report.count
        elif len(into.reports) < 64:  # what one heartbeat may carry; the rest is dropped, not queued
            into.reports.add().CopyFrom(report)
    for item in delta.traffic:
        mine = next((t for t in into.traffic if t.kind == item.kind), None)
        mine = mine or into.traffic.add(kind=item.kind)
        mine.sent_bytes += item.sent_bytes
        mine.received_bytes += item.received_bytes
        mine.uncompressed_bytes += item.uncompressed_bytes
