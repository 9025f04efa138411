"""A re-plan in two pure steps, as torchft's lighthouse computes a quorum: `compute` returns the
new plan and why (or no plan, with the reason), `diff` says which workers' assignments that
changes and whether it is worth a new plan version. No I/O, no clock; coordinator/swarm/commit.py
records the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from configs.profile import ModelProfile
from coordinator.planning.planner import InfeasiblePlanError, Plan, WorkerCapacity, patch, replan
from coordinator.storage.registry import WorkerRecord
from coordinator.swarm.assignments import role

# Up to this many workers every join/leave runs the full planner search (well under 0.1 s);
# above it, events patch the plan in one cheap pass and the search runs periodically.
FULL_REPLAN_MAX_WORKERS = 256


@dataclass(frozen=True)
class PlanVerdict:
    plan: Plan | None  # None: the live fleet cannot hold the model
    note: str  # why: the planner's note, or the numbers by which the fleet falls short
    reshuffled: bool = False  # a fresh plan replaced the kept one (not a patch, not kept)


@dataclass(frozen=True)
class PlanDiff:
    stage_of: dict[str, int]  # each active worker's stage under the new plan; -1: none
    reassigned: frozenset[str]  # workers whose assignment changes: stage, layers or data shard
    restarted: frozenset[str]  # those of them whose stage or layer span changes: they restart their role
    changed: bool  # split, members or assignments differ: the plan gets a new version


def full_search_due(current: Plan | None, active_workers: int) -> bool:
    return current is None or active_workers <= FULL_REPLAN_MAX_WORKERS


def compute(model: ModelProfile, workers: Sequence[WorkerCapacity], current: Plan | None, *, full: bool,
            min_gain: float) -> PlanVerdict:
    """The plan for `workers`: on a large swarm (`full` false) a cheap patch of `current` if it runs;
    else the full search, which keeps `current` unless a fresh plan is more than `min_gain` faster."""
    try:
        if not full and current is not None:
            patched = patch(model, workers, current)
            if patched.rate > 0:
                return PlanVerdict(patched, patched.note)
        new = replan(model, workers, current, min_gain=min_gain)
    except InfeasiblePlanError as err:
        return PlanVerdict(None, str(err))
    return PlanVerdict(new, new.note, reshuffled=new.note.startswith("re-planned"))


def diff(current: Plan | None, new: Plan | None, active: Sequence[WorkerRecord]) -> PlanDiff:
    """What moving the `active` workers from `current` to `new` changes."""
    old_bounds = current.boundaries if current else None
    new_bounds = new.boundaries if new else None
    stage_of = {r.worker_id: (new.stage_of.get(r.worker_id, -1) if new else -1) for r in active}
    reassigned = {
        r.worker_id
        for r in active
        if stage_of[r.worker_id] != r.stage_index or (stage_of[r.worker_id] >= 0 and new_bounds != old_bounds)
    }
    old_stage0 = {w for w, stage in current.stage_of.items() if stage == 0} if current else set()
    new_stage0 = {w for w, stage in stage_of.items() if stage == 0}
    if old_stage0 != new_stage0:
        reassigned |= new_stage0  # stage 0's data shards are numbered among its members
    by_id = {r.worker_id: r for r in active}
    restarted = {w for w in reassigned if role(current, by_id[w].stage_index) != role(new, stage_of[w])}
    old_members = dict(current.stage_of) if current else {}
    new_members = dict(new.stage_of) if new else {}
    changed = bool(reassigned) or new_bounds != old_bounds or old_members != new_members
    return PlanDiff(stage_of, frozenset(reassigned), frozenset(restarted), changed)
