"""How close a plan runs to its limits, stage by stage: memory used of what its cards offer, the
busiest link's use at the plan's rate, and whether compute or links bound the stage.

A plan's rate is its slowest stage's, so every other stage runs below what it could: each of
its workers trains its own rate scaled by (plan rate / stage rate), and moves that many tokens'
boundary tensors over its link. Pure: `coordinator plan` prints these, and a stage that needs
more than TIGHT_MEMORY of a card's memory is flagged, since the planner's memory figure is an
estimate (configs/profile.py) and a real step needs more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from configs.profile import ModelProfile
from coordinator.planning.plan import Plan, WorkerCapacity
from coordinator.planning.rate_model import Costs, Fleet, link_rates, stage_crossings

__all__ = ["TIGHT_MEMORY", "StageMargin", "stage_margins"]

TIGHT_MEMORY = 0.9  # a stage needing more of a card's memory than this is flagged


@dataclass(frozen=True)
class StageMargin:
    stage: int
    memory_bytes: float  # what training the stage takes (the planner's estimate)
    smallest_card_bytes: float  # the least memory among the stage's workers
    link_use: float  # the busiest of its workers' links: the share in use at the plan's rate
    bound: str  # "compute" or "link": what limits the workers that give the stage most of its rate

    @property
    def memory_use(self) -> float:
        return self.memory_bytes / self.smallest_card_bytes if self.smallest_card_bytes > 0 else float("inf")

    @property
    def tight(self) -> bool:
        return self.memory_use > TIGHT_MEMORY


def stage_margins(profile: ModelProfile, workers: Sequence[WorkerCapacity], plan: Plan) -> list[StageMargin]:
    """One StageMargin per stage of `plan` (every stage must have a worker)."""
    costs, fleet = Costs.for_workers(profile, workers), Fleet(workers)
    flops, mem, act = costs.stages(plan.boundaries)
    traffic = act * stage_crossings(plan.num_stages)  # boundary bytes per token, before the codec
    row = {w: i for i, w in enumerate(fleet.ids)}
    margins = []
    for stage in range(plan.num_stages):
        members = np.array([row[w] for w in plan.workers_on(stage)], dtype=int)
        if members.size == 0:
            raise ValueError(f"stage {stage} of the plan has no worker")
        compute = fleet.flops[members] / flops[stage]
        sent = traffic[stage] * fleet.ratio[members]  # bytes per token on the wire
        link = link_rates(fleet.link[members], sent)
        rates = np.minimum(compute, link)
        share = plan.rate / plan.stage_rates[stage] if plan.stage_rates[stage] > 0 else 0.0
        use = rates * share * sent / fleet.link[members]
        link_bound = float(rates[link < compute].sum())
        margins.append(StageMargin(
            stage=stage, memory_bytes=float(mem[stage]), smallest_card_bytes=float(fleet.mem[members].min()),
            link_use=float(use.max()), bound="link" if link_bound > rates.sum() / 2 else "compute",
        ))
    return margins
