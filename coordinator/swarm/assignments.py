"""What each worker is told to do under a plan (pure: no I/O, no clock).

A worker's `Assignment` names its stage and layers, stage 0's data shard, the codecs and the
averaging period (chosen by coordinator/planning/compression_policy.py from its link and the
compute rate it achieves on that stage), and the averaging group of its stage's replicas.
"""

from __future__ import annotations

from collections.abc import Sequence

from configs.compression import CompressionPolicy
from configs.link import Link
from configs.profile import ModelProfile
from configs.schema import TrainingConfig
from coordinator.planning.compression_policy import WorkerCompression, choose_compression, compression_spec
from coordinator.planning.plan import Plan, WorkerCapacity
from protos import swarmtrain_pb2 as pb

MIN_MEASUREMENTS = 3  # heartbeats that measured a worker before its compression follows the measure


def span(plan: Plan, stage: int) -> tuple[int, int]:
    """The layers [start, end) of `stage`."""
    return plan.boundaries[stage], plan.boundaries[stage + 1]


def role(plan: Plan | None, stage: int) -> tuple[int, int, int] | None:
    """What a worker on `stage` runs: (stage, first layer, end layer); None without a stage. A
    worker whose role changes restarts: it loads other layers and fetches their state."""
    if plan is None or not 0 <= stage < plan.num_stages:
        return None
    return (stage, *span(plan, stage))


def achieved_flops(model: ModelProfile, plan: Plan | None, stage: int, measured_tokens_per_s: float | None,
                   benchmark_flops: float) -> float:
    """The worker's FLOP/s: as measured on its stage once known, else its benchmark's."""
    if measured_tokens_per_s and plan and 0 <= stage < plan.num_stages:
        # drift: trust what the worker really computes on its stage over its benchmark
        start, end = span(plan, stage)
        return measured_tokens_per_s * model.stage_cost(start, end).train_flops_per_token
    return benchmark_flops


def profile_link(profile: pb.WorkerProfile) -> Link:
    """The worker's link as its profile states it in bits/s: the coordinator's one conversion."""
    return Link.from_bits_per_s(profile.upload_bps, profile.download_bps)


def capacity(worker_id: str, stage: int, profile: pb.WorkerProfile, flops: float,
             activation_ratio: float, reachable: bool = True) -> WorkerCapacity:
    """What the planner may count on from a worker."""
    return WorkerCapacity(
        worker_id=worker_id,
        achieved_flops=flops,
        memory_bytes=profile.memory_bytes,
        link=profile_link(profile),
        activation_compression_ratio=activation_ratio,
        stage_index=stage,
        device="cuda" if profile.gpu_count > 0 else "cpu",
        reachable=reachable,
    )


def compression_for(policy: CompressionPolicy, model: ModelProfile, training: TrainingConfig, plan: Plan,
                    stage: int, profile: pb.WorkerProfile, flops: float) -> WorkerCompression:
    """The codecs and averaging period for a worker with `profile`, computing `flops` on `stage`."""
    start, end = span(plan, stage)
    cost = model.stage_cost(start, end)
    stages = plan.num_stages
    crossings = 0 if stages == 1 else 1 if stage in (0, stages - 1) else 2
    return choose_compression(
        policy,
        link=profile_link(profile),
        compute_tokens_per_s=flops / cost.train_flops_per_token,
        activation_bytes_per_token_sent=cost.activation_bytes_per_token * crossings,
        stage_param_bytes=cost.params * 4,
        tokens_per_step=training.tokens_per_step,
        microbatch_tokens=training.tokens_per_microbatch,
    )


def recheck_due(issued: WorkerCompression | None, stage: int, measurements: int, last_reissue: float | None,
                now: float, interval_s: float) -> bool:
    """Whether to compare a worker's issued compression with what its measured rate calls for.
    The issued one was chosen from its benchmark, and a CPU's matmul benchmark can overstate a
    small stage's rate about 2x (tiny at 20 Mbit/s: 31k tokens/s benchmarked, ~14k measured),
    which took its rounds from 8-bit every 64 steps to top-k every 256. Not before
    MIN_MEASUREMENTS heartbeats measured it, and, against noisy rates, not again within
    `interval_s` of its last re-issue."""
    return (issued is not None and stage >= 0 and measurements >= MIN_MEASUREMENTS
            and (last_reissue is None or now - last_reissue >= interval_s))


def assignment(plan: Plan, stage: int, worker_id: str, *, plan_version: int, choice: WorkerCompression,
               stage0: Sequence[str], run_id: str, config_hash: str,
               lease_expires_unix: float, generation: int = 0) -> pb.Assignment:
    """The Assignment for `worker_id` on `stage`; `stage0`: stage 0's active members, whose sorted
    order numbers the data shards."""
    start, end = span(plan, stage)
    message = pb.Assignment(
        plan_version=plan_version,
        stage_index=stage,
        num_stages=plan.num_stages,
        layer_start=start,
        layer_end=end,
        activation_compression=compression_spec(choice.activation_codec, choice),
        sync_compression=compression_spec(choice.sync_codec, choice),
        sync_period_steps=choice.sync_period,
        overlap_steps=choice.overlap_steps,
        averaging_group=f"{run_id}.stage{stage}.layers{start}-{end}",
        config_hash=config_hash,
        lease_expires_unix=lease_expires_unix,
        stage_boundaries=list(plan.boundaries),
        generation=generation,
    )
    if stage == 0:
        shards = sorted(stage0)
        message.data_shard_index = shards.index(worker_id)
        message.data_shard_count = len(shards)
    return message
