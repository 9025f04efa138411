"""A remote stage's answer lost on the way: the driver asks the same replica again, and the stage
counts the microbatch once.

The worst case of a stream that closes without an answer (worker.pipeline.errors.NoAnswer): the
stage computed and accumulated the microbatch, and only its answer was lost. Three stages on
three P2P peers, as in test_pipeline_parity.py; the middle stage's backward and the last
stage's forward_backward each lose their first answer. Training must then match a run where
nothing was lost, step for step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import torch
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2

from tests.harness.loopback import loopback_peers
from tests.harness.stage_pipeline import MICROBATCHES_PER_STEP, serve_pipeline
from tests.harness.stage_pipeline import PARITY_CONFIG as CONFIG
from worker.data.tokens import TokenData
from worker.pipeline import StageServer
from worker.pipeline.wire import handler_name

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]  # each stage on a p2pd daemon of its own


async def lose_first_answer(server: StageServer, method: str) -> list[int]:
    """Serve `method` on `server` as usual, but drop the first answer after it was computed: the
    caller's stream closes with no answer. The returned list counts the requests handled."""
    run = {"backward": server._backward, "forward_backward": server._forward_backward}[method]
    real = server._handler(method, run)
    handled = [0]

    async def lossy(requests: AsyncIterator[runtime_pb2.ExpertRequest],
                    context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        handled[0] += 1
        frames = [frame async for frame in real(requests, context)]  # computed and accumulated
        for frame in frames if handled[0] > 1 else []:
            yield frame

    name = handler_name(server.key, method)
    await server.p2p.remove_protobuf_handler(name, stream_input=True, stream_output=True)
    await server.p2p.add_protobuf_handler(name, lossy, runtime_pb2.ExpertRequest,
                                          stream_input=True, stream_output=True)
    return handled


@pytest.mark.fault("a stage's answers lost on the way back after it computed them")
def test_answers_lost_after_the_stage_computed_them_are_asked_again_and_counted_once() -> None:
    steps = 3
    batches = TokenData.from_run_config(CONFIG).train_batches(CONFIG.training.micro_batch_size)
    data = [[next(batches) for _ in range(MICROBATCHES_PER_STEP)] for _ in range(steps)]

    async def run(lose: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        async with loopback_peers(3) as peers:
            pipeline = await serve_pipeline(peers, CONFIG, "lost", codec="none", max_in_flight=1)
            middle, last = pipeline.servers
            handled = ([await lose_first_answer(middle, "backward"), await lose_first_answer(last, "forward_backward")]
                       if lose else [])
            losses = [(await pipeline.driver.train_step(microbatches)).loss for microbatches in data]
            driver = pipeline.driver.stats
            assert driver.retries == 0 and driver.failed_microbatches == 0, driver.failures
            assert driver.asked_again == (2 if lose else 0), driver.failures
            if lose:
                assert [h[0] for h in handled] == [steps * MICROBATCHES_PER_STEP + 1] * 2
            for server in pipeline.servers:
                assert server.stats.repeats == (1 if lose else 0)
                assert server.stats.samples == steps * CONFIG.training.batch_size  # each sample once
                assert server.stats.steps == steps
            params = {name: p.detach().clone() for stage in pipeline.stages for name, p in stage.named_parameters()}
            return losses, params

    clean_losses, clean_params = asyncio.run(run(lose=False))
    losses, params = asyncio.run(run(lose=True))
    assert losses == pytest.approx(clean_losses, abs=1e-6)
    for name, value in clean_params.items():
        torch.testing.assert_close(params[name], value, atol=1e-6, rtol=1e-6, msg=name)
