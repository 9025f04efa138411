"""Moving a role's bytes to the heartbeat's CounterBook, by kind.

Pipeline bytes come counted by payload kind from the stage client and server themselves
(worker.pipeline.traffic); state bytes (downloads, averaging rounds, the state server, the
round follower, checkpoints) are all kind "state". Sources keep totals; the meter reports what
each added since it last looked.
"""

from __future__ import annotations

from protos import swarmtrain_pb2 as pb
from worker.pipeline.traffic import Traffic
from worker.replicas import StateServer, SyncFollower
from worker.telemetry.counters import CounterBook

PIPELINE_KINDS = {"activation": pb.TRAFFIC_KIND_ACTIVATIONS, "gradient": pb.TRAFFIC_KIND_GRADIENTS}


class TrafficMeter:
    """Reports each source's bytes since the last report to `counters`."""

    def __init__(self, counters: CounterBook) -> None:
        self.counters = counters
        self._seen: dict[object, tuple[int, ...]] = {}  # a source's totals at its last report

    def pipeline(self, traffic: Traffic) -> None:
        """A stage client's or server's activations and gradients."""
        for kind, pb_kind in PIPELINE_KINDS.items():
            count = traffic.by_kind[kind]
            sent, received, uncompressed = self._delta((traffic, kind), count.sent, count.received,
                                                       count.uncompressed)
            if sent or received:
                self.counters.add_traffic(pb_kind, sent=sent, received=received, uncompressed=uncompressed)

    def state_server(self, server: StateServer) -> None:
        (sent,) = self._delta(server, server.stats.bytes_out)
        self.state(sent=sent)

    def follower(self, follower: SyncFollower) -> None:
        out, into = self._delta(follower, follower.bytes_out, follower.bytes_in)
        self.state(sent=out, received=into)

    def state(self, *, sent: int = 0, received: int = 0) -> None:
        if sent > 0 or received > 0:
            self.counters.add_traffic(pb.TRAFFIC_KIND_STATE, sent=max(0, sent), received=max(0, received))

    def forget(self, *sources: object) -> None:
        """Sources that report no more (a stopped role's)."""
        gone = {id(source) for source in sources}
        for key in list(self._seen):
            if id(key[0] if isinstance(key, tuple) else key) in gone:
                del self._seen[key]

    def _delta(self, source: object, *totals: int) -> tuple[int, ...]:
        before = self._seen.get(source, (0,) * len(totals))
        self._seen[source] = totals
        return tuple(now - then for now, then in zip(totals, before, strict=True))
