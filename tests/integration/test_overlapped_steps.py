"""A driver that overlaps steps (`overlap_steps`) sends the next step's first microbatch on
while its own step finishes, and still trains as a pipeline should.

Three stages on three P2P peers, as in test_pipeline_parity.py: real libp2p streams on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

import pytest
import torch

from tests.integration.test_pipeline_parity import CONFIG, MICROBATCHES_PER_STEP, serve_pipeline
from worker.data import TokenData
from worker.pipeline import PipelineError
from worker.pipeline.executor import IGNORE_INDEX
from worker.pipeline.loopback import loopback_peers

pytestmark = pytest.mark.slow

Batch = tuple[torch.Tensor, torch.Tensor]


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.01)


def steps_of_data(count: int) -> list[list[Batch]]:
    batches = TokenData.from_run_config(CONFIG).train_batches(CONFIG.training.micro_batch_size)
    return [[next(batches) for _ in range(MICROBATCHES_PER_STEP)] for _ in range(count)]


def test_the_next_steps_first_microbatch_crosses_the_pipeline_before_that_step_begins() -> None:
    first, second = steps_of_data(2)

    async def main() -> None:
        async with loopback_peers(3) as peers:
            pipeline = await serve_pipeline(peers, CONFIG, "ahead", codec="none", overlap_steps=True)
            last = pipeline.servers[-1].stats
            await pipeline.driver.train_step(first, upcoming=second[0])
            # step 2 has not been called, yet its first microbatch reaches the last stage
            await eventually(lambda: last.backward_calls == MICROBATCHES_PER_STEP + 1,
                             "the early microbatch at the last stage")
            await pipeline.driver.train_step(second)
            assert [s.stats.steps for s in pipeline.servers] == [2, 2]
            assert pipeline.driver.local.stats.steps == pipeline.driver.stats.steps == 2
            assert [s.stats.samples for s in pipeline.servers] == [2 * CONFIG.training.batch_size] * 2
            ledgers = [s.executor.ledger.stats for s in pipeline.servers]
            assert all(x.refused_stale == x.dropped_samples == x.kept_stale_samples == 0 for x in ledgers)

    asyncio.run(main())


def test_overlapped_training_starts_exactly_and_then_follows_the_exact_curve_closely() -> None:
    """Step 1 has nothing sent early, so it matches exactly; after it, one microbatch per step has a
    one-step-stale gradient on the first stage: the curve moves off the exact one, but stays near."""
    steps = 10
    data = steps_of_data(steps)

    async def run(overlap: bool) -> list[float]:
        async with loopback_peers(3) as peers:
            pipeline = await serve_pipeline(peers, CONFIG, "curve", codec="none", overlap_steps=overlap)
            losses = []
            for i, microbatches in enumerate(data):
                upcoming = data[i + 1][0] if i + 1 < steps else None
                losses.append((await pipeline.driver.train_step(microbatches, upcoming)).loss)
            assert [s.stats.steps for s in pipeline.servers] == [steps, steps]
            assert pipeline.driver.stats.retries == 0
            return losses

    exact, overlapped = asyncio.run(run(False)), asyncio.run(run(True))
    assert all(math.isfinite(v) for v in overlapped)
    assert overlapped[0] == pytest.approx(exact[0], abs=1e-6)
    assert overlapped[1:] != pytest.approx(exact[1:], abs=1e-6)  # the overlap did change the maths
    assert overlapped[-1] < overlapped[0] - 1.0
    assert overlapped[-1] == pytest.approx(exact[-1], rel=0.05)


def test_a_failed_overlapped_step_drops_its_early_microbatch_and_the_retry_trains_on() -> None:
    """Step 2's last microbatch is refused by the last stage, after step 3's first was sent on:
    the driver drops that one, retries step 2 on the same data, and the run goes on."""
    steps = 4
    data = steps_of_data(steps)

    async def main() -> None:
        async with loopback_peers(3) as peers:
            pipeline = await serve_pipeline(peers, CONFIG, "retry", codec="none", overlap_steps=True)
            driver = pipeline.driver
            losses = []
            for i, microbatches in enumerate(data):
                upcoming = data[i + 1][0] if i + 1 < steps else None
                if i == 1:
                    inputs, targets = microbatches[-1]
                    refused = (inputs, torch.full_like(targets, IGNORE_INDEX))  # no target: refused
                    with pytest.raises(PipelineError, match="every target is"):
                        await driver.train_step([*microbatches[:-1], refused], upcoming)
                    assert driver._ahead is None  # dropped with the failed step
                losses.append((await driver.train_step(microbatches, upcoming)).loss)
            assert driver.stats.steps == driver.local.stats.steps == steps
            assert all(math.isfinite(v) for v in losses)
            # the remote stages took every step's samples; what the failed attempt and its early
            # microbatch left there is at most one step's worth more
            expected = steps * CONFIG.training.batch_size
            for server in pipeline.servers:
                assert expected <= server.stats.samples <= expected + CONFIG.training.batch_size

    asyncio.run(main())
