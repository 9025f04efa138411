"""A replica of a stage dies mid-run: its calls move to the other replica, and no microbatch is lost.

Four P2P daemons on 127.0.0.1: the driver (stage 0), two replicas of stage 1, and stage 2.
Replica A's daemon is shut down while it is serving a request, as a volunteer's machine
would vanish; stages keep no per-microbatch state, so whatever A was computing is simply
sent again to replica B.
"""

from __future__ import annotations

import asyncio
import math
import random
from functools import partial

import pytest

from configs.loader import load_config
from tests.harness.loopback import loopback_peers
from worker.data.tokens import TokenData
from worker.model.stage import build_stage
from worker.pipeline import (
    PipelineDriver,
    PipelineError,
    Replica,
    ReplicaPicker,
    Route,
    StageClient,
    StageRoute,
    StageServer,
)
from worker.runtime.standalone import build_optimizer

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]  # stages on p2pd daemons

CONFIG = load_config(
    "tiny",
    [
        "model.n_layer=3",
        "training.seq_len=64",
        "training.micro_batch_size=4",
        "training.batch_size=8",
        "training.warmup_steps=0",
        "data.max_corpus_bytes=300000",
    ],
)
MICROBATCHES_PER_STEP = CONFIG.training.batch_size // CONFIG.training.micro_batch_size
WARM_STEPS, STEPS_AFTER = 2, 6
MAX_WARM_STEPS = 10


async def poll(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


@pytest.mark.fault("a stage replica dies mid-step (its micro-batches in flight)")
def test_a_replica_dies_mid_run_and_its_microbatches_are_retried_elsewhere() -> None:
    training = CONFIG.training
    data = TokenData.from_run_config(CONFIG)
    batches = data.train_batches(training.micro_batch_size)
    optimizer = partial(build_optimizer, training=training)
    stage = partial(build_stage, CONFIG.model, seed=training.seed)

    async def main() -> None:
        async with loopback_peers(4) as (driver_peer, peer_a, peer_b, peer_last):
            # both replicas serve the same key, as two volunteers assigned the same stage do
            replica_a = await StageServer(
                peer_a, stage(1, 2), "fo.stage1", optimizer, training.batch_size
            ).start()
            replica_b = await StageServer(
                peer_b, stage(1, 2), "fo.stage1", optimizer, training.batch_size
            ).start()
            last = await StageServer(
                peer_last, stage(2, 3), "fo.stage2", optimizer, training.batch_size
            ).start()
            route = Route(
                (
                    StageRoute(
                        1,
                        "fo.stage1",
                        (
                            Replica(peer_a.peer_id, tuple(await peer_a.get_visible_maddrs())),
                            Replica(peer_b.peer_id, tuple(await peer_b.get_visible_maddrs())),
                        ),
                    ),
                    StageRoute(
                        2,
                        "fo.stage2",
                        (Replica(peer_last.peer_id, tuple(await peer_last.get_visible_maddrs())),),
                    ),
                )
            )
            picker = ReplicaPicker(rng=random.Random(0), cooldown_s=300.0)
            first = stage(0, 1)
            driver = PipelineDriver(
                StageClient(driver_peer),
                first,
                optimizer(first),
                route,
                batch_size=training.batch_size,
                max_in_flight=2,
                timeout_s=20.0,
                picker=picker,
            )

            warm = await driver.train(batches, WARM_STEPS, MICROBATCHES_PER_STEP)
            # both replicas in use before one dies: the picker weighs them by their measured rates,
            # and on a busy machine one slow first call can keep a replica out for a step or two
            while not (replica_a.stats.backward_calls and replica_b.stats.backward_calls) and len(warm) < MAX_WARM_STEPS:
                warm += await driver.train(batches, 1, MICROBATCHES_PER_STEP)
            assert replica_a.stats.backward_calls > 0 and replica_b.stats.backward_calls > 0, len(warm)
            assert driver.stats.retries == 0

            b_calls_at_death = 0

            async def kill_a_while_it_serves() -> None:
                nonlocal b_calls_at_death
                await poll(lambda: replica_a.stats.in_flight > 0, "replica A to take a request")
                b_calls_at_death = replica_b.stats.forward_calls + replica_b.stats.backward_calls
                await peer_a.shutdown()

            killer = asyncio.create_task(kill_a_while_it_serves())
            after = await driver.train(batches, STEPS_AFTER, MICROBATCHES_PER_STEP)
            await killer

            reports = warm + after
            warm_steps = len(warm)
            total_samples = (warm_steps + STEPS_AFTER) * training.batch_size
            assert all(math.isfinite(r.loss) for r in reports)
            # none lost: every microbatch went all the way through, and reached the loss exactly once
            assert driver.stats.microbatches == (warm_steps + STEPS_AFTER) * MICROBATCHES_PER_STEP
            assert driver.stats.failed_microbatches == 0
            assert driver.stats.steps == warm_steps + STEPS_AFTER
            assert last.stats.samples == total_samples and last.stats.steps == warm_steps + STEPS_AFTER
            # the dead replica's calls were retried on the live one
            assert driver.stats.retries >= 1 and sum(r.retries for r in after) == driver.stats.retries
            assert any("stage 1" in note for note in driver.stats.failures)
            assert picker.cooling_down(peer_a.peer_id) and not picker.cooling_down(peer_b.peer_id)
            assert replica_b.stats.forward_calls + replica_b.stats.backward_calls > b_calls_at_death
            # every microbatch's stage-1 gradient was accumulated by some replica (a retried
            # backward may have completed on A just before it died, so at least once)
            assert replica_a.stats.samples + replica_b.stats.samples >= total_samples

            # with the last replica gone too, the step fails with a clear error, not a hang
            await peer_b.shutdown()
            with pytest.raises(PipelineError, match=r"stage 1 \(fo.stage1\) forward: no replica left of 2"):
                await driver.train_step([next(batches) for _ in range(MICROBATCHES_PER_STEP)])
            assert driver.stats.failed_microbatches == MICROBATCHES_PER_STEP
            assert driver.local.stats.pending_samples == 0  # the broken step's local gradients were dropped

    asyncio.run(main())
