"""One GetSwarm cache for admission, stage 0's route and our stage's replicas (worker.runtime.swarm_view)."""

from __future__ import annotations

import asyncio

from hivemind.p2p import PeerID

from protos import swarmtrain_pb2 as pb
from worker.runtime.swarm_view import SwarmView

ME, A, B, C = (PeerID(bytes([i + 1]) * 34).to_base58() for i in range(4))
ACTIVE = pb.WORKER_STATE_ACTIVE


def swarm() -> pb.GetSwarmResponse:
    return pb.GetSwarmResponse(
        stages=[pb.StageInfo(stage_index=0, layer_start=0, layer_end=2),
                pb.StageInfo(stage_index=1, layer_start=2, layer_end=4)],
        workers=[pb.WorkerInfo(state=ACTIVE, stage_index=0, peer_id=ME),
                 pb.WorkerInfo(state=ACTIVE, stage_index=0, peer_id=A, tokens_per_second=5.0, serves_state=True),
                 pb.WorkerInfo(state=ACTIVE, stage_index=1, peer_id=B, multiaddrs=["/ip4/127.0.0.1/tcp/1"]),
                 pb.WorkerInfo(state=ACTIVE, stage_index=1, peer_id="not base58 !"),
                 pb.WorkerInfo(state=pb.WORKER_STATE_UNSPECIFIED, stage_index=1, peer_id=C)])


class Coordinator:
    def __init__(self) -> None:
        self.calls = 0
        self.down = False

    async def get_swarm(self) -> pb.GetSwarmResponse:
        self.calls += 1
        await asyncio.sleep(0)  # let other readers come while this one is in flight
        if self.down:
            raise ConnectionError("coordinator away")
        return swarm()


def test_every_consumer_reads_through_one_cache_and_readers_at_once_share_one_call() -> None:
    async def main() -> None:
        clock = [100.0]
        coordinator = Coordinator()
        view = SwarmView(coordinator.get_swarm, ME, clock=lambda: clock[0])
        admitted, mine, (route, why) = await asyncio.gather(
            view.admitted(), view.stage_replicas(0, (0, 2)), view.route("run", 2, (0, 2), None, max_age=3.0))
        assert coordinator.calls == 1
        assert admitted == {ME, A, B, "not base58 !"}  # who may call us: every active worker
        assert [r.peer_id.to_base58() for r in mine.replicas] == [A]  # never ourselves
        assert mine.trained == {A} and mine.serving == {A}
        assert route is not None and why == ""
        assert [r.peer_id.to_base58() for r in route.stages[0].replicas] == [B]  # unreadable ids skipped
        assert route.stages[0].key == "run.stage1.2-4"
        clock[0] += 2.0
        await view.stage_replicas(0, (0, 2))
        assert coordinator.calls == 1  # young enough
        await view.route("run", 2, (0, 2), route, max_age=0.0)
        assert coordinator.calls == 2  # the route asks for a read now
        view.invalidate()
        assert view.known_replicas(0, (0, 2)).replicas == []
    asyncio.run(main())


def test_a_coordinator_away_keeps_what_was_read_and_a_changed_plan_lists_nobody() -> None:
    async def main() -> None:
        clock = [100.0]
        coordinator = Coordinator()
        view = SwarmView(coordinator.get_swarm, ME, clock=lambda: clock[0])
        route, _ = await view.route("run", 2, (0, 2), None, max_age=0.0)
        coordinator.down, clock[0] = True, 200.0
        assert [r.peer_id.to_base58() for r in (await view.stage_replicas(0, (0, 2))).replicas] == [A]
        assert await view.route("run", 2, (0, 2), route, max_age=0.0) == (route, "cannot read the swarm "
                                                                                  "(ConnectionError)")
        assert view.known_replicas(0, (0, 3)).replicas == []  # our layers moved: not our stage's replicas
        coordinator.down = False
        assert (await view.route("run", 3, (0, 2), route, max_age=0.0))[1] == "the coordinator's plan is changing"
    asyncio.run(main())
