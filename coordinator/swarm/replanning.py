"""A re-plan in pure steps, as torchft's lighthouse computes a quorum: `compute` returns the
new plan and why (or no plan, with the reason), `sparing_state` keeps trained state where it
can and says when the swarm must roll back, `diff` says which workers' assignments that
changes and whether it is worth a new plan version. No I/O, no clock; coordinator/swarm/commit.py
records the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from configs.profile import ModelProfile
from coordinator.planning.planner import InfeasiblePlanError, Plan, WorkerCapacity, patch, replan
from coordinator.storage.checkpoints import Checkpoint
from coordinator.storage.registry import WorkerRecord
from coordinator.swarm.assignments import role
from coordinator.swarm.rollback import Generation, Rollback
from coordinator.swarm.rollback import verdict as rollback_verdict

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


def sparing_state(model: ModelProfile, workers: Sequence[WorkerCapacity], current: Plan | None,
                  verdict: PlanVerdict, lost: Callable[[Plan], list[int]], *, trained_tokens: int,
                  generation: Generation, newest: Checkpoint | None) -> tuple[PlanVerdict, Rollback | None]:
    """`verdict`, unless it is a re-split by choice that loses some stage's trained state (`lost`)
    after tokens were trained in this generation: then the current split, patched, where that runs.
    Also the rollback the returned plan calls for, if any (coordinator/swarm/rollback.py)."""
    if verdict.plan is None:
        return verdict, None
    gone = lost(verdict.plan)
    costly = trained_tokens > generation.start_tokens
    if gone and costly and verdict.reshuffled and current is not None:
        kept = compute(model, workers, current, full=False, min_gain=math.inf)
        if kept.plan is not None and not kept.reshuffled and not lost(kept.plan):
            note = (f"kept plan: a re-split would lose the trained state of stage(s) "
                    f"{', '.join(map(str, gone))} and roll the swarm back; {kept.note}")
            return PlanVerdict(kept.plan, note), None
    resplit = current is not None and verdict.plan.boundaries != current.boundaries
    return verdict, rollback_verdict(gone, verdict.plan.boundaries, resplit=resplit, trained_tokens=trained_tokens, generation=generation,
                                     checkpoint=(newest.checkpoint_id, newest.trained_tokens) if newest else None)


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
