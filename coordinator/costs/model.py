"""What training a token budget costs: FLOPs, memory, time, money and energy. Pure arithmetic.

Counting follows configs/profile.py: 6 FLOPs per parameter per token to train, 2 to infer,
and 16 bytes per parameter of weights + gradients + optimizer state (activations excluded).
On top of that:

* time = FLOPs / achieved FLOP/s, where achieved = datasheet peak (configs/gpus.yaml, at the
  run's precision) x `mfu`, the model-FLOPs utilisation a training run reaches;
* money = GPU-hours x an hourly price (the catalog's rental price, or an owner's own);
* energy = board power x time, priced per kWh (config `metrics.energy_usd_per_kwh`).

Two ways to spend a budget are priced: a swarm of volunteer GPUs, whose tokens/s is what the
coordinator's planner expects of it (`estimate_swarm`), and N rented datacenter GPUs training
data parallel (`estimate_datacenter`). Nothing here reads files or the network.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from configs.catalog import GpuSpec
from configs.fleet import FleetGroup
from configs.link import Link
from configs.memory import stage_peak, usable_memory
from configs.profile import (
    ModelProfile,
    TrainMemory,
    inference_flops_per_token,
    train_flops_per_token,
    train_memory_breakdown,
)
from coordinator.planning.pipeline_rate import PipelineEstimate, Schedule, pipeline_estimate
from coordinator.planning.planner import InfeasiblePlanError, Plan, WorkerCapacity, plan
from coordinator.planning.rate_model import Costs, Fleet

__all__ = [
    "DEFAULT_MFU",
    "DatacenterEstimate",
    "LayerFit",
    "RunCost",
    "SwarmEstimate",
    "achieved_flops",
    "energy_kwh",
    "estimate_datacenter",
    "estimate_swarm",
    "fleet_workers",
    "inference_flops",
    "layers_that_fit",
    "run_cost",
    "stage_gpus",
    "train_flops",
    "train_memory",
    "train_memory_per_param",
    "training_seconds",
]

# Model-FLOPs utilisation: the share of datasheet peak a training run turns into model FLOPs.
# Well-tuned large runs on datacenter GPUs report 40-50% (Megatron-LM on A100, PaLM on TPUv4);
# the catalog notes 30-60% in practice. 0.4 is the middle of that and the same for every card,
# so a swarm and a datacenter run are compared like for like; pass another value to vary it.
DEFAULT_MFU = 0.4

SECONDS_PER_HOUR = 3600.0
JOULES_PER_KWH = 3.6e6


# ----------------------------------------------------------------------------- FLOPs and memory


def train_flops(params: int, tokens: int) -> int:
    """6 x params x tokens: forward 2, backward 4 per parameter per token."""
    return train_flops_per_token(params) * tokens


def inference_flops(params: int, tokens: int) -> int:
    """2 x params x tokens: a forward pass only."""
    return inference_flops_per_token(params) * tokens


def train_memory(params: int, precision: str) -> TrainMemory:
    """Weights, gradients, fp32 master copy and Adam state, by kind (configs.profile's breakdown)."""
    return train_memory_breakdown(params, precision)


def train_memory_per_param(precision: str) -> int:
    """Bytes each parameter costs to train: 16 at fp32 (4+4+8) and at bf16/fp16 (2+2+4+8)."""
    return train_memory_breakdown(1, precision).total


# ----------------------------------------------------------------------------- time, money, energy


def achieved_flops(peak_flops: float, mfu: float = DEFAULT_MFU) -> float:
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1] (got {mfu})")
    return peak_flops * mfu


def training_seconds(flops: float, flops_per_s: float) -> float:
    if flops_per_s <= 0:
        raise ValueError(f"flops_per_s must be > 0 (got {flops_per_s})")
    return flops / flops_per_s


def energy_kwh(watts: float, seconds: float) -> float:
    return watts * seconds / JOULES_PER_KWH


@dataclass(frozen=True)
class RunCost:
    """What training `tokens` takes on `gpus` GPUs that all run for the whole wall time."""

    tokens: int
    gpus: int
    tokens_per_s: float
    seconds: float
    gpu_hours: float
    rent_usd: float  # GPU-hours at the hourly prices; a rental price includes its power
    energy_kwh: float  # board power x wall time: GPUs only, no host, cooling or PSU losses
    energy_usd: float  # energy_kwh at the given $/kWh: what an owner pays to run their own GPUs


def run_cost(tokens: int, tokens_per_s: float, *, gpus: int, watts: float, usd_per_hour: float,
             usd_per_kwh: float) -> RunCost:
    """`watts` and `usd_per_hour` are summed over the `gpus` GPUs."""
    if tokens_per_s <= 0:
        raise ValueError(f"tokens_per_s must be > 0 (got {tokens_per_s})")
    seconds = tokens / tokens_per_s
    hours = seconds / SECONDS_PER_HOUR
    kwh = energy_kwh(watts, seconds)
    return RunCost(tokens=tokens, gpus=gpus, tokens_per_s=tokens_per_s, seconds=seconds,
                   gpu_hours=gpus * hours, rent_usd=usd_per_hour * hours, energy_kwh=kwh,
                   energy_usd=kwh * usd_per_kwh)


# ----------------------------------------------------------------------------- memory fit


@dataclass(frozen=True)
class LayerFit:
    """How many transformer blocks one GPU can hold for training (0 = not even one)."""

    middle: int  # blocks alone, as a middle stage
    first: int  # blocks next to the embedding
    last: int  # blocks next to ln_f + lm_head
    whole_model: bool  # the model and its head and embedding, on this GPU alone


def layers_that_fit(profile: ModelProfile, memory_bytes: float) -> LayerFit:
    """What a GPU of `memory_bytes` holds: its stage's peak (configs/memory.py) within what the card
    offers less the CUDA context and the framework. A middle stage has at most n_layer - 2 blocks."""
    n = profile.n_layer
    usable = usable_memory(int(memory_bytes), "cuda")

    def longest(fits: Sequence[bool]) -> int:
        return next((k for k in range(len(fits), 0, -1) if fits[k - 1]), 0)

    def fits(start: int, end: int) -> bool:
        return stage_peak(profile, start, end, "cuda") <= usable

    middle = longest([fits(1, 1 + k) for k in range(1, n - 1)])
    first = longest([fits(0, k) for k in range(1, n + 1)])
    last = longest([fits(n - k, n) for k in range(1, n + 1)])
    return LayerFit(middle=middle, first=first, last=last, whole_model=fits(0, n))


# ----------------------------------------------------------------------------- a swarm


def fleet_workers(groups: Sequence[FleetGroup], precision: str, *, mfu: float = DEFAULT_MFU,
                  activation_ratio: float = 1.0) -> list[WorkerCapacity]:
    """What the planner would see of this fleet once every GPU has joined and benchmarked.

    A joining worker reports its measured FLOP/s and its memory less the framework's reserve;
    here the measurement is stood in for by peak x mfu. `activation_ratio` is the heaviest activation codec the
    compression policy allows, which the live coordinator assumes for every worker too.
    """
    owners = [g for g in groups for _ in range(g.count)]
    return [
        WorkerCapacity(worker_id=f"{g.gpu.id}#{i}", achieved_flops=achieved_flops(g.gpu.peak(precision), mfu),
                       memory_bytes=usable_memory(g.gpu.memory_bytes, "cuda"), link=Link.from_mbps(g.link_mbps),
                       activation_compression_ratio=activation_ratio)
        for i, g in enumerate(owners)
    ]


@dataclass(frozen=True)
class SwarmEstimate:
    cost: RunCost  # counts the GPUs the plan uses; idle ones neither train, cost nor draw power
    plan: Plan
    gpu_of: dict[str, GpuSpec]  # worker id -> its card, for describing stages
    idle: int  # GPUs the plan leaves without a stage
    workers: tuple[WorkerCapacity, ...] = ()  # what the planner saw of the fleet
    pipeline: PipelineEstimate | None = None  # the plan's rate with the schedule's fill and drain, if given


def estimate_swarm(profile: ModelProfile, groups: Sequence[FleetGroup], tokens: int, *, precision: str,
                   usd_per_kwh: float, mfu: float = DEFAULT_MFU, activation_ratio: float = 1.0,
                   min_replicas: int = 2, schedule: Schedule | None = None) -> SwarmEstimate:
    """Tokens/s the planner expects of this fleet, and what the budget then takes.

    The planner's rate model counts compute and activation traffic on each worker's link. With
    a `schedule` the run is priced at the rate the pipeline keeps of it (fill and drain each step,
    micro-batches in flight, averaging's share of the links: planning/pipeline_rate.py), else at
    the slowest stage's; churn is left out either way. Raises InfeasiblePlanError if the fleet
    cannot hold the model.
    """
    workers = fleet_workers(groups, precision, mfu=mfu, activation_ratio=activation_ratio)
    owner = dict(zip((w.worker_id for w in workers), (g for g in groups for _ in range(g.count)), strict=True))
    p = plan(profile, workers, min_replicas=min_replicas)
    if p.rate <= 0:
        raise InfeasiblePlanError(f"the planner found no plan that trains on this fleet ({p.note})")
    used = list(p.stage_of)
    pipeline = pipeline_estimate(Costs.for_workers(profile, workers), Fleet(workers), p, schedule) if schedule else None
    cost = run_cost(tokens, pipeline.rate if pipeline else p.rate, gpus=len(used),
                    watts=sum(owner[w].gpu.board_power_watts for w in used),
                    usd_per_hour=sum(owner[w].usd_per_hour for w in used), usd_per_kwh=usd_per_kwh)
    gpu_of = {w: g.gpu for w, g in owner.items()}
    return SwarmEstimate(cost=cost, plan=p, gpu_of=gpu_of, idle=len(workers) - len(used), workers=tuple(workers),
                         pipeline=pipeline)


def stage_gpus(estimate: SwarmEstimate, stage: int) -> Counter[str]:
    """Catalog ids of the GPUs serving `stage`, counted."""
    return Counter(estimate.gpu_of[w].id for w in estimate.plan.workers_on(stage))


# ----------------------------------------------------------------------------- a datacenter


@dataclass(frozen=True)
class DatacenterEstimate:
    cost: RunCost
    gpu: GpuSpec
    sharded: bool  # False: a full replica per GPU; True: training state split across the GPUs
    memory_per_gpu: float  # bytes each GPU holds at its peak
    whole_peak: float = 0.0  # the peak of training the whole model on one GPU


def estimate_datacenter(profile: ModelProfile, gpu: GpuSpec, count: int, tokens: int, *, precision: str,
                        usd_per_kwh: float, mfu: float = DEFAULT_MFU) -> DatacenterEstimate:
    """`count` rented `gpu`s training data parallel, every GPU on its share of each batch.

    Where one GPU holds the whole model's training peak (configs/memory.py) each keeps a full
    replica (plain data parallel); otherwise weights, gradients and optimizer state are split
    evenly across them (ZeRO-3 / FSDP-style) and activations are recomputed in the backward
    (activation checkpointing, as sharded runs of this size do), which leaves the FLOPs as
    counted here up to the recomputed forward. Gradient all-reduce and
    shard gathers run over NVLink or InfiniBand and are taken to overlap with compute.
    Raises InfeasiblePlanError if even the split state does not fit.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1 (got {count})")
    peak = stage_peak(profile, 0, profile.n_layer, "cuda")
    state = profile.total.train_memory_bytes  # what sharding splits; the rest is activations and buffers
    usable = usable_memory(gpu.memory_bytes, "cuda")
    sharded = peak > usable
    per_gpu = state / count if sharded else peak
    if per_gpu > usable:
        raise InfeasiblePlanError(
            f"{count}× {gpu.id} cannot hold the model: training needs {state / 2**30:.1f} GiB of state, they "
            f"offer {count * usable / 2**30:.1f} GiB between them (less the CUDA context): use at least "
            f"{math.ceil(state / usable)}"
        )
    rate = count * achieved_flops(gpu.peak(precision), mfu) / profile.total.train_flops_per_token
    cost = run_cost(tokens, rate, gpus=count, watts=count * gpu.board_power_watts,
                    usd_per_hour=count * gpu.usd_per_hour, usd_per_kwh=usd_per_kwh)
    return DatacenterEstimate(cost=cost, gpu=gpu, sharded=sharded, memory_per_gpu=per_gpu, whole_peak=peak)
