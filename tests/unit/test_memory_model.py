"""The memory model (configs/memory.py): its terms, what autograd really saves in our blocks, and
the planner placing stages by it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from configs.catalog import load_catalog
from configs.fleet import load_fleet
from configs.link import Link
from configs.loader import load_config
from configs.memory import (
    FRAMEWORK_BYTES,
    TrainingShape,
    block_activation_bytes,
    microbatches_in_flight,
    span_memory,
    stage_peak,
    training_shape,
    usable_memory,
)
from configs.profile import block_params, model_profile
from configs.schema import ModelConfig
from coordinator.costs.model import estimate_swarm
from coordinator.planning.plan import WorkerCapacity
from coordinator.planning.planner import plan
from coordinator.planning.rate_model import planning_device
from worker.model.gptj import GPTJSpan

GPTJ = load_config("gptj-6b")


def saved_bytes(model: ModelConfig, seq: int) -> int:
    """The bytes autograd keeps for the backward of one block (a middle one), fp32 on the CPU."""
    span = GPTJSpan(model, 1, 2).train()
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    hidden = torch.randn(1, seq, model.d_model, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        span(hidden)
    own = {p.untyped_storage().data_ptr() for p in span.parameters()} | {hidden.untyped_storage().data_ptr()}
    return sum(n for ptr, n in storages.items() if ptr not in own)


@pytest.mark.parametrize("d_ff", [None, 512, 1024])
def test_block_activations_are_what_autograd_saves(d_ff: int | None) -> None:
    model = load_config("tiny").model.model_copy(update={"d_model": 256, "n_head": 8, "d_ff": d_ff})
    shape = TrainingShape(seq_len=128, device="cpu")
    predicted = block_activation_bytes(model, shape)
    # saved_bytes leaves out the hidden state passed in; inside a stage a block saves its input
    # (the previous block's output), so add it
    measured = saved_bytes(model, 128)
    assert 0.85 * predicted <= measured + model.d_model * 128 * 4 <= 1.15 * predicted, (measured, predicted)


def test_dropout_keeps_the_attention_scores_quadratic_in_the_sequence() -> None:
    model = GPTJ.model.model_copy(update={"dropout": 0.1})
    short, long = (block_activation_bytes(model, TrainingShape(seq_len=t)) for t in (1024, 2048))
    plain = block_activation_bytes(GPTJ.model, TrainingShape(seq_len=2048))
    assert long - plain == 12 * model.n_head * 2048**2  # the scores, their softmax, the dropout mask
    assert long > 2 * short  # more than linear


def test_the_peak_is_the_backward_or_the_optimizer_step_whichever_is_larger() -> None:
    shape = TrainingShape(precision="fp32", seq_len=2048, device="cuda")
    middle = span_memory(GPTJ.model, 5, 8, shape)
    params = 3 * block_params(GPTJ.model)
    assert middle.resident == 16 * params  # fp32 weights and gradients, Adam's two moments
    assert middle.autocast_copies == 0
    assert middle.device == middle.resident + max(middle.activations, middle.optimizer_step)
    assert middle.optimizer_step == 4 * params  # the foreach AdamW on CUDA: one buffer for all
    # CPU: one tensor at a time, two buffers of the largest (fc_in / fc_out: d x ff)
    on_cpu = span_memory(GPTJ.model, 5, 8, TrainingShape(seq_len=2048, device="cpu"))
    assert on_cpu.optimizer_step == 2 * 4 * GPTJ.model.d_model * GPTJ.model.inner_dim


def test_autocast_copies_only_on_cuda_and_the_averaging_state_in_host_ram_on_a_gpu() -> None:
    bf16_gpu = span_memory(GPTJ.model, 5, 8, TrainingShape(precision="bf16", device="cuda"))
    bf16_cpu = span_memory(GPTJ.model, 5, 8, TrainingShape(precision="bf16", device="cpu"))  # trains fp32
    params = 3 * block_params(GPTJ.model)
    assert bf16_gpu.autocast_copies == 2 * params and bf16_cpu.autocast_copies == 0
    assert bf16_gpu.activations < span_memory(GPTJ.model, 5, 8, TrainingShape(device="cuda")).activations
    # anchor, residual, a round's pseudo-gradient; as a leader its broadcast residual
    assert bf16_gpu.host == bf16_gpu.diloco == 4 * 4 * params
    assert bf16_cpu.host == 0 and bf16_cpu.device > bf16_cpu.resident + bf16_cpu.diloco
    follower = span_memory(GPTJ.model, 5, 8, TrainingShape(device="cuda", leads=False, outer_momentum=True))
    leader = span_memory(GPTJ.model, 5, 8, TrainingShape(device="cuda", outer_momentum=True))
    assert (follower.diloco, leader.diloco) == (3 * 4 * params, 5 * 4 * params)


def test_in_flight_micro_batches_multiply_every_stage_but_the_last() -> None:
    one, four = (TrainingShape(seq_len=2048, device="cuda", in_flight=n) for n in (1, 4))
    middle = [span_memory(GPTJ.model, 5, 8, s).activations for s in (one, four)]
    last = [span_memory(GPTJ.model, 25, 28, s).activations for s in (one, four)]
    assert middle[1] == 4 * middle[0]
    assert last[0] == last[1]  # forward and backward in one call: one micro-batch at a time
    logits = 12 * 2048 * GPTJ.model.vocab_size
    assert last[0] > logits > span_memory(GPTJ.model, 5, 8, one).activations / 3


def test_a_worker_offers_its_memory_less_the_framework_and_the_allocators_slack() -> None:
    card = 24 * 2**30
    assert usable_memory(card, "cuda") == int((card - FRAMEWORK_BYTES["cuda"]) * 0.95)
    assert usable_memory(card, "cpu") == card - FRAMEWORK_BYTES["cpu"]
    assert usable_memory(2**20, "cuda") == 0


def test_a_runs_shape_comes_from_its_training_section() -> None:
    shape = training_shape(GPTJ.training, "cuda")
    assert (shape.precision, shape.seq_len, shape.micro_batch) == (
        GPTJ.training.precision, GPTJ.training.seq_len, GPTJ.training.micro_batch_size)
    assert shape.autocast == (GPTJ.training.precision != "fp32")
    with pytest.raises(ValueError, match="not a non-empty part"):
        span_memory(GPTJ.model, 3, 3, shape)
    # a step's micro-batches, at most 4, in flight; as many again when steps overlap
    assert (shape.in_flight, training_shape(GPTJ.training, "cuda", overlap_steps=True).in_flight) == (4, 8)
    tiny = load_config("tiny").training  # batch 16 of micro-batches of 8: two per step
    assert microbatches_in_flight(tiny) == 2 and microbatches_in_flight(tiny, overlap_steps=True) == 4
    deeper = load_config("gptj-6b", ["training.microbatches_in_flight=16"]).training  # the operator's choice
    assert training_shape(deeper, "cuda").in_flight == 16


# ----------------------------------------------------------------------------- the planner places by it


def cpu_workers(count: int, memory: int) -> list[WorkerCapacity]:
    return [WorkerCapacity(f"w{i}", 5e10, memory, Link.from_mbps(10_000), device="cpu") for i in range(count)]


def test_the_planner_places_stages_by_their_peak_not_by_16_bytes_per_parameter() -> None:
    """Tiny trains in 13 MiB by 16 B/param alone, so four 50 MiB CPU workers would each hold it
    whole; at its peak (activations, averaging state) it needs ~57 MiB, and the planner splits it."""
    config = load_config("tiny")
    resident = model_profile(config.model, "fp32")
    real = model_profile(config.model, "fp32", config.training)
    workers = cpu_workers(4, 50 * 2**20)
    assert plan(resident, workers).num_stages == 1
    split = plan(real, workers)
    assert split.num_stages == 2
    memory = {w.worker_id: w.memory_bytes for w in workers}
    for worker, stage in split.stage_of.items():
        start, end = split.boundaries[stage], split.boundaries[stage + 1]
        assert stage_peak(real, start, end, "cpu") <= memory[worker]


def test_a_cpu_worker_plans_the_fleet_with_its_larger_figure() -> None:
    """A CPU worker keeps its averaging state in the memory its stage uses; a GPU keeps it in host
    RAM. One CPU worker in a fleet makes the planner use the CPU's (larger) figures for all."""
    config = load_config("tiny")
    real = model_profile(config.model, "fp32", config.training)
    assert stage_peak(real, 0, 4, "cpu") > stage_peak(real, 0, 4, "cuda")
    gpus = [WorkerCapacity(f"g{i}", 5e10, 50 * 2**20, Link.from_mbps(10_000)) for i in range(2)]
    assert planning_device(gpus) == "cuda" and planning_device(gpus + cpu_workers(1, 2**30)) == "cpu"
    assert plan(real, gpus).num_stages == 1  # a GPU holds tiny whole in 50 MiB, a CPU worker does not
    with pytest.raises(ValueError, match="device must be"):
        WorkerCapacity("x", 1e9, 2**30, Link.from_mbps(100), device="tpu")


def test_every_card_of_the_consumer_fleet_holds_its_stages_peak() -> None:
    fleet = load_fleet(Path(__file__).resolve().parents[2] / "configs" / "fleets" / "consumer-64.yaml",
                       load_catalog())
    profile = model_profile(GPTJ.model, GPTJ.training.precision, GPTJ.training)
    swarm = estimate_swarm(profile, fleet, GPTJ.training.total_tokens, precision="bf16", usd_per_kwh=0.15)
    p = swarm.plan
    assert len(p.stage_of) > 32  # most of the 64 cards serve
    for worker, stage in p.stage_of.items():
        peak = stage_peak(profile, p.boundaries[stage], p.boundaries[stage + 1], "cuda")
        assert peak <= usable_memory(swarm.gpu_of[worker].memory_bytes, "cuda"), (worker, stage)
