"""A new replica downloads its stage's state from a listed replica that does not serve it yet.

The coordinator lists a replica from its assignment on, while the replica is still building its
stage: asked then, its daemon answers that it has no handler for the state yet. The joiner asks
again until a deadline (worker.replicas.state_transfer.fetch_served_state) instead of starting from
the seed. Two real P2P peers on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from configs.loader import load_config
from tests.harness.loopback import loopback_peers
from worker.model.stage import build_stage
from worker.pipeline import Replica, StageClient
from worker.pipeline.failover import not_serving_yet
from worker.replicas.state_transfer import StateServer, fetch_served_state

pytestmark = pytest.mark.multiprocess  # replicas on p2pd daemons

CONFIG = load_config("tiny", [])
KEY = "join.stage1.2-4"


def stage(seed: int) -> torch.nn.Module:
    return build_stage(CONFIG.model, 2, 4, seed)


@pytest.mark.fault("a replica that serves its state late to a joiner")
def test_a_replica_that_starts_serving_late_is_waited_for_and_its_state_downloaded() -> None:
    async def main() -> None:
        async with loopback_peers(2) as (joiner, listed):
            served = stage(seed=1)
            server = StateServer(listed, KEY, served, lambda: None, lambda: 17)
            replica = Replica(listed.peer_id, tuple(await listed.get_visible_maddrs()))
            waits: list[float] = []
            started: list[asyncio.Task[StateServer]] = []

            def waiting(left: float) -> None:  # told it is not served yet: the replica now finishes building
                waits.append(left)
                started.append(asyncio.create_task(server.start()))

            mine = stage(seed=2)
            state = await fetch_served_state(StageClient(joiner), replica, KEY, mine, 5.0,
                                             time.monotonic() + 20.0, waiting)
            assert len(waits) == 1 and 0 < waits[0] <= 20.0
            assert state.step == 17
            for got, want in zip(state.tensors, served.parameters(), strict=True):
                assert torch.equal(got, want.detach())
            await server.stop()
    asyncio.run(main())


@pytest.mark.fault("a replica that never serves its state to a joiner")
def test_a_replica_that_never_serves_is_given_up_on_at_the_deadline() -> None:
    async def main() -> None:
        async with loopback_peers(2) as (joiner, listed):
            replica = Replica(listed.peer_id, tuple(await listed.get_visible_maddrs()))
            waits: list[float] = []
            with pytest.raises(Exception) as caught:  # the daemon's own error type
                await fetch_served_state(StageClient(joiner), replica, KEY, stage(seed=2), 5.0,
                                         time.monotonic() + 1.5, waits.append)
            assert not_serving_yet(caught.value), caught.value
            assert len(waits) == 1  # told once, however many times it asked
    asyncio.run(main())
