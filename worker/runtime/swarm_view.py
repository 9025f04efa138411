"""The worker's one view of the coordinator's GetSwarm, shared by everything that asks who is where.

Three things ask: admission (who may call our handlers, worker.pipeline.admission), stage 0's
route (the replicas of the stages after ours) and our stage's replicas (who else holds our stage,
which of them have trained, which serve their state, and whom a round leader may lead). One
cache serves them all: a read younger than the asker's `max_age` is answered from it, and asks
that come while a read is in flight wait for that read instead of sending their own. Each
worker in a response is parsed once, into a `Peer`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from hivemind.p2p import PeerID

from protos import swarmtrain_pb2 as pb
from worker.pipeline import Replica, Route, StageRoute
from worker.pipeline.admission import MIN_REFRESH_S
from worker.runtime.policy import stage_key

FetchSwarm = Callable[[], Awaitable[pb.GetSwarmResponse]]

ROUTE_REFRESH_S = 3.0  # how old a read may be for the route and our stage's replicas


@dataclass(frozen=True)
class Peer:
    """An active worker of the swarm other than us, with a peer id we can dial."""

    stage_index: int
    replica: Replica
    trained: bool  # it has a measured rate: its state is worth waiting for
    serves_state: bool  # per its last heartbeat, its stage's state can be downloaded from it

    @property
    def peer_id(self) -> str:
        return self.replica.peer_id.to_base58()


@dataclass(frozen=True)
class StageReplicas:
    """Our stage's other live replicas, and which of them have trained and which serve their state."""

    replicas: list[Replica] = field(default_factory=list)
    trained: frozenset[str] = frozenset()
    serving: frozenset[str] = frozenset()

    @property
    def ids(self) -> list[str]:
        return [r.peer_id.to_base58() for r in self.replicas]


@dataclass(frozen=True)
class _Read:
    swarm: pb.GetSwarmResponse
    at: float  # monotonic
    peers: list[Peer]
    admitted: frozenset[str]
    spans: dict[int, tuple[int, int]]


class SwarmView:
    """GetSwarm through one cache; `me` is our own peer id (base58), never listed as a peer."""

    def __init__(self, fetch: FetchSwarm, me: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.fetch, self.me, self.clock = fetch, me, clock
        self._read: _Read | None = None
        self._lock = asyncio.Lock()

    async def read(self, max_age: float = ROUTE_REFRESH_S) -> pb.GetSwarmResponse:
        """The swarm as read at most `max_age` seconds ago (0: read it now). Raises when the
        coordinator cannot be read; what was read before stays."""
        return (await self._fresh(max_age)).swarm

    def invalidate(self) -> None:
        """Forget what was read: a new plan may list other replicas."""
        self._read = None

    async def admitted(self) -> set[str]:
        """Peer ids of the swarm's active workers: who may call our compute and averaging handlers."""
        return set((await self._fresh(MIN_REFRESH_S)).admitted)

    async def stage_replicas(self, index: int, span: tuple[int, int]) -> StageReplicas:
        """The other live replicas of stage `index` on layers `span`, re-read every ROUTE_REFRESH_S;
        while the coordinator cannot be read, those read last (none if nothing was)."""
        try:
            await self._fresh(ROUTE_REFRESH_S)
        except Exception:  # noqa: BLE001 - the coordinator may be away: keep what we knew
            pass
        return self.known_replicas(index, span)

    def known_replicas(self, index: int, span: tuple[int, int] | None) -> StageReplicas:
        """`stage_replicas` as of the last read, without reading (on the loop, at once)."""
        read = self._read
        if read is None or span is None or read.spans.get(index) != span:
            return StageReplicas()
        mine = [p for p in read.peers if p.stage_index == index]
        return StageReplicas([p.replica for p in mine], frozenset(p.peer_id for p in mine if p.trained),
                             frozenset(p.peer_id for p in mine if p.serves_state))

    async def route(self, run_id: str, num_stages: int, span: tuple[int, int] | None, current: Route | None,
                    max_age: float, generation: int = 0) -> tuple[Route | None, str]:
        """The stages after stage 0 (ours, on layers `span`) as GetSwarm lists them, or None (and why)
        while one has no replica. While the coordinator cannot be read, `current` stays the route:
        the pipeline trains on its lease through a coordinator outage (a dead replica in it is
        failed over by the picker)."""
        try:
            read = await self._fresh(max_age)
        except Exception as err:  # noqa: BLE001 - the coordinator may be away for a while
            return current, f"cannot read the swarm ({type(err).__name__})"
        if read.swarm.generation != generation:
            return None, "the swarm went back to a checkpoint; waiting for the new assignment"
        stages = sorted(read.swarm.stages, key=lambda s: s.stage_index)
        if len(stages) != num_stages or not stages or (stages[0].layer_start, stages[0].layer_end) != span:
            return None, "the coordinator's plan is changing"
        replicas: dict[int, list[Replica]] = {s.stage_index: [] for s in stages[1:]}
        for peer in read.peers:
            if peer.stage_index in replicas:
                replicas[peer.stage_index].append(peer.replica)
        empty = [i for i, found in replicas.items() if not found]
        if empty:
            return None, f"no replica yet for stage {', '.join(map(str, empty))}"
        return Route(tuple(
            StageRoute(s.stage_index, stage_key(run_id, s.stage_index, s.layer_start, s.layer_end, generation),
                       tuple(replicas[s.stage_index]))
            for s in stages[1:]
        )), ""

    async def _fresh(self, max_age: float) -> _Read:
        asked = self.clock()
        read = self._read
        if read is not None and asked - read.at < max_age:
            return read
        async with self._lock:
            read = self._read
            # a read that ended while we waited for the lock is as fresh as one of ours
            if read is not None and (read.at >= asked or self.clock() - read.at < max_age):
                return read
            swarm = await self.fetch()
            read = self._read = _parse(swarm, self.me, self.clock())
            return read


def _parse(swarm: pb.GetSwarmResponse, me: str, at: float) -> _Read:
    peers = []
    for worker in swarm.workers:
        if worker.state != pb.WORKER_STATE_ACTIVE or not worker.peer_id or worker.peer_id == me:
            continue
        try:
            peer_id = PeerID.from_base58(worker.peer_id)
        except Exception:  # noqa: BLE001 - a peer id we cannot read: skip that worker
            continue
        peers.append(Peer(worker.stage_index, Replica(peer_id, tuple(worker.multiaddrs)),
                          worker.tokens_per_second > 0, worker.serves_state))
    admitted = frozenset(w.peer_id for w in swarm.workers if w.state == pb.WORKER_STATE_ACTIVE and w.peer_id)
    spans = {s.stage_index: (s.layer_start, s.layer_end) for s in swarm.stages}
    return _Read(swarm, at, peers, admitted, spans)
