"""training.precision in the pipeline: bf16 autocast on a GPU for a stage's forward and its
recomputed backward, with fp32 weights, gradients and boundary tensors; a CPU trains in fp32."""

from __future__ import annotations

import asyncio

import pytest
import torch

from configs.loader import load_config
from worker.model.stage import build_stage
from worker.pipeline.executor import StageExecutor
from worker.runtime.standalone import build_optimizer

CONFIG = load_config("tiny")


def last_stage_step(device: str, precision: str) -> tuple[float, torch.Tensor, torch.Tensor]:
    """One forward_backward of tiny's last two layers: the loss, the grad wrt inputs, the logits."""
    stage = build_stage(CONFIG.model, 2, CONFIG.model.n_layer, seed=0).to(device)
    executor = StageExecutor(stage, build_optimizer(stage, CONFIG.training), accumulate_samples=1000,
                             precision=precision)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 32, CONFIG.model.d_model, generator=gen).to(device)
    targets = torch.randint(0, CONFIG.model.vocab_size, (2, 32), generator=gen).to(device)
    loss, grad = asyncio.run(executor.forward_backward(hidden, targets))
    logits = asyncio.run(executor.forward(hidden))
    assert all(p.dtype == torch.float32 for p in stage.parameters())
    return loss, grad, logits


def test_a_cpu_stage_trains_in_fp32_whatever_the_config_says() -> None:
    loss32, grad32, logits32 = last_stage_step("cpu", "fp32")
    loss16, grad16, logits16 = last_stage_step("cpu", "bf16")
    assert logits16.dtype == torch.float32 and grad16.dtype == torch.float32
    assert loss16 == loss32 and torch.equal(grad16, grad32) and torch.equal(logits16, logits32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_gpu_stage_computes_in_bf16_and_keeps_fp32_at_its_edges() -> None:
    loss32, grad32, _ = last_stage_step("cuda", "fp32")
    loss16, grad16, logits16 = last_stage_step("cuda", "bf16")
    assert logits16.dtype == torch.bfloat16  # the head ran under autocast
    assert grad16.dtype == torch.float32  # what crosses the boundary back stays fp32
    assert abs(loss16 - loss32) <= 0.02 * loss32
    assert torch.nn.functional.cosine_similarity(grad16.flatten(), grad32.flatten(), dim=0) > 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_fp16_trains_a_pipeline_stage_in_fp32_until_loss_scaling_spans_stages() -> None:
    _, _, logits = last_stage_step("cuda", "fp16")
    assert logits.dtype == torch.float32
