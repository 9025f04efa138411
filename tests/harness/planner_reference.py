"""The planner's references for tests: fleets that make memory bind, and the optimum found by
trying every split and every assignment (small fleets only), with the rate model written out
plainly from ModelProfile.stage_cost rather than through the planner's arrays."""

from __future__ import annotations

import itertools

import numpy as np

from configs.link import Link
from configs.memory import stage_peak
from configs.profile import ModelProfile, model_profile
from configs.schema import ModelConfig
from coordinator.planning.planner import WorkerCapacity


def small_profile(n_layer: int) -> ModelProfile:
    """GPT-J 6B's layer shapes with fewer layers: ~3.2 GB per layer to train, so memory binds."""
    model = ModelConfig(n_layer=n_layer, d_model=4096, n_head=16, rotary_dim=64, vocab_size=50400,
                        n_ctx=2048, d_ff=16384)
    return model_profile(model, "bf16")


def hand_made_fleet(rng: np.random.Generator, size: int) -> list[WorkerCapacity]:
    """FLOP/s 1e13-2e14, memory 8-80 GB, links 10 Mbit/s-10 Gbit/s, a mix of activation codecs."""
    fleet = []
    for i in range(size):
        up = 10 ** rng.uniform(7, 10)
        fleet.append(WorkerCapacity(
            worker_id=f"w{i}",
            achieved_flops=float(10 ** rng.uniform(13, np.log10(2e14))),
            memory_bytes=int(rng.choice([8, 10, 12, 16, 24, 32, 40, 48, 80]) * 1e9),
            link=Link.from_bits_per_s(up, up * rng.uniform(1, 4)),
            activation_compression_ratio=float(rng.choice([1.0, 0.5, 0.26])),
        ))
    return fleet


def worker_rate(profile: ModelProfile, w: WorkerCapacity, start: int, end: int, num_stages: int) -> float:
    """The rate model written out plainly, from ModelProfile.stage_cost and the stage's peak on
    the worker's own device (the planner's arrays use the fleet's one device: the same where
    every worker trains on the same kind)."""
    cost = profile.stage_cost(start, end)
    if stage_peak(profile, start, end, "cpu" if w.device == "cpu" else "cuda") > w.memory_bytes:
        return 0.0
    compute = w.achieved_flops / cost.train_flops_per_token
    if num_stages == 1:
        return compute
    crossings = 1 if start == 0 or end == profile.n_layer else 2
    sent = cost.activation_bytes_per_token * crossings * w.activation_compression_ratio
    return min(compute, min(w.link.upload_bps, w.link.download_bps) / 8 / sent)


def best_rate(profile: ModelProfile, workers: list[WorkerCapacity], max_stages: int, need: int) -> float:
    """Best slowest-stage rate over every stage count <= max_stages, every split and every
    assignment in which each stage has at least `need` workers that fit it."""
    n, count = profile.n_layer, len(workers)
    best = 0.0
    for stages in range(1, min(n, max_stages) + 1):
        every = np.indices((stages,) * count).reshape(count, -1).T  # all stages**count assignments
        rows = np.arange(len(every))
        for cuts in itertools.combinations(range(1, n), stages - 1):
            bounds = (0, *cuts, n)
            rate = np.array([[worker_rate(profile, w, bounds[s], bounds[s + 1], stages)
                              for s in range(stages)] for w in workers])
            sums = np.zeros((len(every), stages))
            fits = np.zeros((len(every), stages), dtype=int)
            for i in range(count):
                sums[rows, every[:, i]] += rate[i, every[:, i]]
                fits[rows, every[:, i]] += rate[i, every[:, i]] > 0
            ok = fits.min(axis=1) >= need
            if ok.any():
                best = max(best, float(sums.min(axis=1)[ok].max()))
    return best


def brute_force(profile: ModelProfile, workers: list[WorkerCapacity], min_replicas: int = 2) -> float:
    """The optimum under plan()'s rule: replicated plans only, if any exists (they have at most
    W // min_replicas stages), else any plan."""
    replicated = best_rate(profile, workers, len(workers) // min_replicas, min_replicas)
    return replicated if replicated > 0 else best_rate(profile, workers, len(workers), 1)
