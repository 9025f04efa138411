"""A driver that overlaps steps (`overlap_steps`) sends the next step's microbatches on while
its own step finishes, and still trains as a pipeline should.

Three stages on three P2P peers, as in test_pipeline_parity.py: real libp2p streams on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

import pytest
import torch

from tests.harness.loopback import loopback_peers
from tests.harness.stage_pipeline import MICROBATCHES_PER_STEP, serve_pipeline
from tests.harness.stage_pipeline import PARITY_CONFIG as CONFIG
from worker.data.tokens import TokenData
from worker.pipeline import PipelineError
from worker.pipeline.executor import IGNORE_INDEX

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]  # each stage on a p2pd daemon of its own

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


def test_the_next_steps_microbatches_cross_the_pipeline_before_that_step_begins() -> None:
    first, second = steps_of_data(2)

    async def main() -> None:
        async with loopback_peers(3) as peers:
            pipeline = await serve_pipeline(peers, CONFIG, "ahead", codec="none", overlap_steps=True)
            last = pipeline.servers[-1].stats
            await pipeline.driver.train_step(first, upcoming=second)
            # step 2 has not been called, yet its microbatches reach the last stage
            await eventually(lambda: last.backward_calls == 2 * MICROBATCHES_PER_STEP,
                             "the early microbatches at the last stage")
            await pipeline.driver.train_step(second)
            assert [s.stats.steps for s in pipeline.servers] == [2, 2]
            assert pipeline.driver.local.stats.steps == pipeline.driver.stats.steps == 2
            assert [s.stats.samples for s in pipeline.servers] == [2 * CONFIG.training.batch_size] * 2
            ledgers = [s.executor.ledger.stats for s in pipeline.servers]
            assert all(x.refused_stale == x.dropped_samples == x.kept_stale_samples == 0 for x in ledgers)

    asyncio.run(main())


def test_no_more_of_the_next_step_goes_ahead_than_a_step_keeps_in_flight() -> None:
    """Sent-ahead microbatches keep their activations until the step ends, on top of the step's
    own: at most max_in_flight of them go (configs/memory.py counts that many), the rest wait
    for their step."""
    first, second = steps_of_data(2)

    async def main() -> None:
        async with loopback_peers(3) as peers:
            pipeline = await serve_pipeline(peers, CONFIG, "bounded", codec="none", overlap_steps=True)
            pipeline.driver.max_in_flight = 1
            await pipeline.driver.train_step(first, upcoming=second)
            assert pipeline.driver.sent_ahead == 1
            await pipeline.driver.train_step(second)
            assert [s.stats.samples for s in pipeline.servers] == [2 * CONFIG.training.batch_size] * 2

    asyncio.run(main())


def test_overlapped_training_counts_every_sample_once_and_follows_the_exact_curve() -> None:
    """After step 1, the first stage's gradients are one step stale (and the remote stages may
    take two steps' microbatches in either order): the curve moves off the exact one, but stays
    near it, and every stage steps on every sample exactly once."""
    steps = 10
    data = steps_of_data(steps)

    async def run(overlap: bool) -> list[float]:
        async with loopback_peers(3) as peers:
            pipeline = await serve_pipeline(peers, CONFIG, "curve", codec="none", overlap_steps=overlap)
            losses = []
            for i, microbatches in enumerate(data):
                upcoming = data[i + 1] if i + 1 < steps else []
                losses.append((await pipeline.driver.train_step(microbatches, upcoming)).loss)
            assert [s.stats.steps for s in pipeline.servers] == [steps, steps]
            assert [s.stats.samples for s in pipeline.servers] == [steps * CONFIG.training.batch_size] * 2
            assert pipeline.driver.stats.retries == 0
            return losses

    exact, overlapped = asyncio.run(run(False)), asyncio.run(run(True))
    assert all(math.isfinite(v) for v in overlapped)
    assert overlapped != pytest.approx(exact, abs=1e-6)  # the overlap did change the maths
    assert overlapped[-1] < overlapped[0] - 1.0
    # the last steps' mean, as single steps' losses swing with their batches
    assert sum(overlapped[-3:]) / 3 == pytest.approx(sum(exact[-3:]) / 3, rel=0.08)


def test_a_failed_overlapped_step_drops_its_early_microbatches_and_the_retry_trains_on() -> None:
    """Step 2's last microbatch is refused by the last stage, after step 3's were sent on: the
    driver drops those, retries step 2 on the same data, and the run goes on."""
    steps = 4
    data = steps_of_data(steps)

    async def main() -> None:
        async with loopback_peers(3) as peers:
            pipeline = await serve_pipeline(peers, CONFIG, "retry", codec="none", overlap_steps=True)
            driver = pipeline.driver
            losses = []
            for i, microbatches in enumerate(data):
                upcoming = data[i + 1] if i + 1 < steps else []
                if i == 1:
                    inputs, targets = microbatches[-1]
                    refused = (inputs, torch.full_like(targets, IGNORE_INDEX))  # no target: refused
                    with pytest.raises(PipelineError, match="every target is"):
                        await driver.train_step([*microbatches[:-1], refused], upcoming)
                    assert driver.sent_ahead == 0  # dropped with the failed step
                losses.append((await driver.train_step(microbatches, upcoming)).loss)
            assert driver.stats.steps == driver.local.stats.steps == steps
            assert all(math.isfinite(v) for v in losses)
            # the remote stages took every step's samples, plus what they could not take out
            # again: the failed attempt's first microbatch and the two sets of early microbatches
            # the failure orphaned (step 2's, which the failed attempt did not match, and step 3's)
            expected = steps * CONFIG.training.batch_size
            orphaned = CONFIG.training.micro_batch_size + 2 * CONFIG.training.batch_size
            for server in pipeline.servers:
                assert expected <= server.stats.samples <= expected + orphaned

    asyncio.run(main())
