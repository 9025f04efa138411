"""What a plan trains per second once the pipeline's schedule is counted, not only its slowest stage.

The planner ranks plans by their slowest stage's rate (`Plan.rate`): what the stages sustain
while the pipeline is full. A real step is not always full. Each replica of the first stage
drives its own pipeline (worker/pipeline/driver.py): it sends a step's `m` micro-batches, at
most `in_flight` at once, waits for the last one's gradients, then steps. So every step
fills and drains the pipeline, and a micro-batch's round trip (its compute on every stage
and its activations and gradients on every link) is paid once per step on top of the
bottleneck's share. With D drivers sharing the stages:

    step_s = round_trip_s + (m - 1) x max(D x b / slowest_stage_rate, round_trip_s / in_flight)
    rate   = min(slowest_stage_rate, D x m x b / step_s)        (b: tokens per micro-batch)

The first term of the max is the bottleneck's time for one micro-batch of every driver;
the second is Little's law for a driver whose few micro-batches in flight cannot keep a
long pipeline busy. A single stage gives rate = its own (no boundary, nothing to fill), and
GPipe's m / (m + S - 1) falls out for S equal stages of one worker each. With overlapping
steps the next step's micro-batches fill the drain, so only the steady part counts.

Averaging rounds share each replica's link with activations: a replicated stage's workers
keep `averaging_share` of their link for them (the compression policy sizes a round to
`sync_budget` of the steps between rounds). A newcomer's state download is a one-off cost,
given per stage by `state_download_s`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from configs.compression import CompressionPolicy
from configs.memory import microbatches_in_flight
from configs.profile import ModelProfile
from configs.schema import TrainingConfig
from coordinator.planning.plan import Plan, WorkerCapacity
from coordinator.planning.rate_model import Costs, Fleet, link_rates, stage_crossings

__all__ = ["PipelineEstimate", "Schedule", "live_estimate", "pipeline_estimate", "schedule_of",
           "state_download_s"]

STATE_BYTES_PER_PARAM = 4  # a newcomer downloads its stage's fp32 parameters (averaging state follows them)


@dataclass(frozen=True)
class Schedule:
    """How the first stage's drivers feed the pipeline."""

    microbatches_per_step: int
    in_flight: int  # per driver, at once
    tokens_per_microbatch: int
    overlap_steps: bool = False
    averaging_share: float = 0.0  # of a replicated stage's links, kept for averaging rounds

    def __post_init__(self) -> None:
        if min(self.microbatches_per_step, self.in_flight, self.tokens_per_microbatch) < 1:
            raise ValueError(f"a schedule needs at least one micro-batch of one token in flight (got {self})")
        if not 0 <= self.averaging_share < 1:
            raise ValueError(f"averaging_share must be in [0, 1) (got {self.averaging_share})")


def schedule_of(training: TrainingConfig, policy: CompressionPolicy) -> Schedule:
    return Schedule(
        microbatches_per_step=training.batch_size // training.micro_batch_size,
        in_flight=microbatches_in_flight(training),
        tokens_per_microbatch=training.tokens_per_microbatch,
        overlap_steps=policy.overlap_steps,
        averaging_share=policy.sync_budget,
    )


@dataclass(frozen=True)
class PipelineEstimate:
    rate: float  # tokens/s the swarm trains, fill and drain counted
    slowest_stage_rate: float  # tokens/s of the slowest stage with its links shared by averaging
    round_trip_s: float  # one micro-batch through every stage and back, links included
    step_s: float  # one driver's optimizer step
    drivers: int  # replicas of the first stage, each driving its own micro-batches

    @property
    def efficiency(self) -> float:
        """The share of the slowest stage's rate the schedule keeps."""
        return self.rate / self.slowest_stage_rate if self.slowest_stage_rate > 0 else 0.0


def pipeline_estimate(costs: Costs, fleet: Fleet, plan: Plan, schedule: Schedule) -> PipelineEstimate:
    """The swarm's tokens/s under `plan` with `schedule` (module docstring); every stage must have
    a worker that holds it."""
    b = schedule.tokens_per_microbatch
    flops, mem, act = costs.stages(plan.boundaries)
    crossings = stage_crossings(plan.num_stages)
    row = {w: i for i, w in enumerate(fleet.ids)}
    stage_rates, round_trip = [], 0.0
    for stage in range(plan.num_stages):
        members = np.array([row[w] for w in plan.workers_on(stage)], dtype=int)
        if members.size == 0 or np.any(fleet.mem[members] < mem[stage]):
            raise ValueError(f"stage {stage} of the plan has no worker, or one that cannot hold it")
        compute = fleet.flops[members] / flops[stage]  # tokens/s
        link = fleet.link[members] * (1 - schedule.averaging_share if members.size > 1 else 1.0)
        sent = act[stage] * crossings[stage] * fleet.ratio[members]  # bytes per token over its link
        stage_rates.append(float(np.minimum(compute, link_rates(link, sent)).sum()))
        # a micro-batch meets one replica: the mean one's compute, and its link once per crossing
        round_trip += float(np.mean(b / compute + np.where(sent > 0, b * sent / link, 0.0)))
    slowest = min(stage_rates)
    drivers = len(plan.workers_on(0))
    m = schedule.microbatches_per_step
    steady = max(drivers * b / slowest, round_trip / schedule.in_flight)  # seconds per micro-batch
    step = m * steady if schedule.overlap_steps else round_trip + (m - 1) * steady
    return PipelineEstimate(rate=min(slowest, drivers * m * b / step), slowest_stage_rate=slowest,
                            round_trip_s=round_trip, step_s=step, drivers=drivers)


def state_download_s(costs: Costs, fleet: Fleet, plan: Plan, stage: int) -> float:
    """Seconds a newcomer to `stage` takes to fetch its parameters from the stage's fastest
    holder (that holder's link carries it, beside its own traffic)."""
    start, end = plan.boundaries[stage], plan.boundaries[stage + 1]
    params = costs.params_of(start, end)
    row = {w: i for i, w in enumerate(fleet.ids)}
    links = [fleet.link[row[w]] for w in plan.workers_on(stage)]
    return STATE_BYTES_PER_PARAM * params / max(links) if links else float("inf")


def live_estimate(profile: ModelProfile, workers: Sequence[WorkerCapacity], boundaries: Sequence[int],
                  schedule: Schedule) -> PipelineEstimate | None:
    """The estimate for `workers` where they serve now (their stage_index) on the stages of
    `boundaries`: with the rates the coordinator has measured, it is the model's prediction of
    what the swarm trains. None while a stage has no worker that holds it."""
    serving = [w for w in workers if 0 <= w.stage_index < len(boundaries) - 1]
    plan = Plan(tuple(boundaries), {w.worker_id: w.stage_index for w in serving}, ())
    if not serving:
        return None
    try:
        return pipeline_estimate(Costs.for_workers(profile, serving), Fleet(serving), plan, schedule)
    except ValueError:
        return None
