"""Three stages on three P2P peers compute what the whole model computes, and train as it trains.

Each stage is served by its own p2pd daemon on 127.0.0.1 (the driver's peer holds stage 0),
so activations and gradients cross real libp2p streams. Stages are built with the same
seed as the full model, whose weights depend only on (seed, parameter name).
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from configs.schema import RunConfig
from tests.harness.loopback import loopback_peers
from tests.harness.stage_pipeline import MICROBATCHES_PER_STEP, PARITY_CONFIG, serve_pipeline
from worker.data.tokens import TokenData
from worker.model.gptj import GPTJ, init_parameters, lm_loss
from worker.model.schedule import learning_rate_at
from worker.model.stage import StageModule
from worker.pipeline import PipelineError
from worker.pipeline.executor import IGNORE_INDEX
from worker.runtime.standalone import build_optimizer

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]  # each stage on a p2pd daemon of its own

CONFIG = PARITY_CONFIG


def full_model(config: RunConfig) -> GPTJ:
    model = GPTJ(config.model)
    init_parameters(model, config.training.seed, config.model.init_std)
    return model


def random_microbatch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    training = CONFIG.training
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(
        0, CONFIG.model.vocab_size, (training.micro_batch_size, training.seq_len + 1), generator=g
    )
    return ids[:, :-1], ids[:, 1:]


def assert_grads_match(stages: list[StageModule], model: GPTJ, atol: float, rtol: float) -> None:
    reference = dict(model.named_parameters())
    names = set()
    for stage in stages:
        for name, p in stage.named_parameters():
            names.add(name)
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, reference[name].grad, atol=atol, rtol=rtol, msg=name)
    assert names == set(reference)  # the stages cover the model, so every gradient was compared


def test_one_microbatch_gives_the_full_models_loss_and_gradients() -> None:
    inputs, targets = random_microbatch()
    model = full_model(CONFIG)
    loss = lm_loss(model(inputs), targets)
    (loss / MICROBATCHES_PER_STEP).backward()  # the pipeline scales each microbatch for its step

    async def main() -> None:
        async with loopback_peers(3) as peers:
            pipeline = await serve_pipeline(peers, CONFIG, "exact", codec="none")
            pipeline_loss = await pipeline.driver.run_microbatch(inputs, targets)
            assert abs(pipeline_loss - loss.item()) <= 1e-5
            assert_grads_match(pipeline.stages, model, atol=1e-5, rtol=1e-5)
            # one microbatch of a two-microbatch step: accumulated, nobody stepped
            assert [s.stats.pending_samples for s in pipeline.servers] == [4, 4]
            assert all(s.stats.steps == 0 for s in pipeline.servers)
            client = pipeline.driver.client.stats
            assert client.calls == 3 and client.bytes_out > 2 * inputs.numel() * CONFIG.model.d_model * 4

    asyncio.run(main())


def test_float16_on_the_wire_stays_close() -> None:
    """fp16 rounds each boundary activation to 11 significant bits (relative error <= 2**-11,
    ~5e-4). The loss is a mean over 256 tokens of log-probabilities whose rounding errors
    mostly cancel: it moves by ~1e-6 to 1e-5 (measured over several batches), so 1e-4 on a
    loss of ~5.5 leaves a 10x margin and still catches a wrong scale or a lost tensor.
    Gradients come back as per-row scaled fp16, ~5e-4 relative error per tensor."""
    inputs, targets = random_microbatch()
    model = full_model(CONFIG)
    loss = lm_loss(model(inputs), targets)
    (loss / MICROBATCHES_PER_STEP).backward()

    async def main() -> None:
        async with loopback_peers(3) as peers:
            pipeline = await serve_pipeline(peers, CONFIG, "half", codec="float16")
            pipeline_loss = await pipeline.driver.run_microbatch(inputs, targets)
            assert pipeline_loss != loss.item()  # the rounding really happened
            assert abs(pipeline_loss - loss.item()) <= 1e-4
            reference = dict(model.named_parameters())
            for stage in pipeline.stages:
                for name, p in stage.named_parameters():
                    error = (p.grad - reference[name].grad).norm() / reference[name].grad.norm().clamp_min(
                        1e-12
                    )
                    assert error.item() < 5e-3, name

    asyncio.run(main())


def test_training_through_the_pipeline_matches_local_training() -> None:
    steps = 5
    data = TokenData.from_run_config(CONFIG)
    training = CONFIG.training

    # the single-process reference: local_training's loop, step for step
    model = full_model(CONFIG)
    optimizer = build_optimizer(model, training)
    batches = data.train_batches(training.micro_batch_size)
    local_losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, training)
        step_loss = 0.0
        for _ in range(MICROBATCHES_PER_STEP):
            inputs, targets = next(batches)
            loss = lm_loss(model(inputs), targets) / MICROBATCHES_PER_STEP
            loss.backward()
            step_loss += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        local_losses.append(step_loss)

    async def main() -> None:
        async with loopback_peers(3) as peers:
            # both microbatches of a step in flight at once: order of arrival must not matter
            pipeline = await serve_pipeline(peers, CONFIG, "train", codec="none", max_in_flight=2)
            reports = await pipeline.driver.train(
                data.train_batches(training.micro_batch_size), steps, MICROBATCHES_PER_STEP
            )
            losses = [r.loss for r in reports]
            assert losses[-1] < losses[0] - 1.0  # byte-level loss falls fast from ln(256)
            assert all(math.isfinite(v) for v in losses)
            assert losses == pytest.approx(local_losses, abs=1e-5)
            assert [s.stats.steps for s in pipeline.servers] == [steps, steps]
            assert pipeline.driver.stats.steps == steps and pipeline.driver.stats.retries == 0
            reference = dict(model.named_parameters())
            for stage in pipeline.stages:
                for name, p in stage.named_parameters():
                    torch.testing.assert_close(
                        p.detach(), reference[name].detach(), atol=1e-5, rtol=1e-5, msg=name
                    )

    asyncio.run(main())


def test_a_step_that_fails_halfway_and_is_retried_trains_as_if_it_had_not_failed() -> None:
    """The first microbatch of a step goes through every stage, the second is refused by the last
    stage: the driver retries the step on the same data, and the remote stages must not count
    the first microbatch twice nor step early (they drop what the failed attempt left)."""
    steps, failing_step = 4, 2
    data = TokenData.from_run_config(CONFIG)
    training = CONFIG.training

    async def run(fail: bool) -> tuple[list[float], dict[str, torch.Tensor], list[int]]:
        async with loopback_peers(3) as peers:
            pipeline = await serve_pipeline(peers, CONFIG, "retry", codec="none", max_in_flight=1)
            batches = data.train_batches(training.micro_batch_size)
            losses = []
            for step in range(1, steps + 1):
                microbatches = [next(batches) for _ in range(MICROBATCHES_PER_STEP)]
                if fail and step == failing_step:
                    inputs, targets = microbatches[-1]
                    refused = (inputs, torch.full_like(targets, IGNORE_INDEX))  # no target: refused
                    with pytest.raises(PipelineError, match="every target is"):
                        await pipeline.driver.train_step([*microbatches[:-1], refused])
                losses.append((await pipeline.driver.train_step(microbatches)).loss)
            params = {name: p.detach().clone() for stage in pipeline.stages for name, p in stage.named_parameters()}
            return losses, params, [s.stats.steps for s in pipeline.servers]

    clean_losses, clean_params, clean_steps = asyncio.run(run(fail=False))
    losses, params, server_steps = asyncio.run(run(fail=True))
    assert server_steps == clean_steps == [steps, steps]
    assert losses == pytest.approx(clean_losses, abs=1e-6)
    for name, value in clean_params.items():
        torch.testing.assert_close(params[name], value, atol=1e-6, rtol=1e-6, msg=name)
