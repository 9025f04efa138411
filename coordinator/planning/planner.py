"""Pipeline planning: how many stages, which layers each holds, which worker serves which stage.

Pure functions over numbers: the coordinator hands in the model's cost profile and what each
live worker can do, and gets back a `Plan`. Nothing here touches the network or the disk.

The model of the swarm (kept deliberately simple, because every input is an estimate):

* A worker on stage [start, end) trains `min(compute rate, link rate)` tokens per second.
  Compute rate = achieved FLOP/s / the stage's training FLOPs per token. Link rate = the
  slower direction of its link / the bytes per token it must move across stage boundaries:
  a middle stage sends activations forward and gradients backward (2 crossings), the first
  and last stage 1, a single-stage plan none. A worker whose memory cannot hold the stage's
  peak (configs/memory.py: parameters, gradients, optimizer state, activations of the
  micro-batches in flight, the optimizer step's buffers, on a CPU worker its averaging state)
  contributes nothing there.
* Replicas of a stage split its tokens, so a stage's rate is the sum of its workers' rates,
  and the pipeline runs at the rate of its slowest stage.

`plan()` maximizes that slowest-stage rate. The problem is a max-min partition (NP-hard in
general). A fleet of up to EXACT_MAX_WORKERS (8) is solved exactly, by dynamic programming
over layer prefixes and worker subsets (`exact`). A larger one is searched:

1. Starting splits, per stage count from the fewest stages memory allows up to the count
   at which every worker fits every stage: the balanced split, and splits shaped by the
   fleet's memory (big stages for big cards, small ones so that small cards serve too).
2. Each split gets a greedy placement (strongest workers first, each where its rate times
   a stage price is highest, prices falling as stages fill) and a local search that raises
   the slowest stage by moving or swapping workers into it. A large fleet is ranked on a
   fixed sample of it: stage rates scale with the fleet, so the ranking barely changes.
3. The best candidates are refined by turns: the optimal boundaries for the teams they
   have, better teams for those boundaries, boundaries shifted one layer with teams searched
   again, and for small fleets random kicks that let the local search leave a local optimum.

Small fleets' plans are the brute-force optimum (tests/unit/test_planner.py,
tests/unit/test_exact_planning.py); 10,000 workers plan in under a second of CPU
(tests/benchmarks/bench_planner.py: 0.78 s, median of 5, GPT-J priced at its stages' peak
memory). `replan()` adds hysteresis so that a live swarm is not reshuffled for small gains.

Where the parts live (all under `coordinator/planning/`): `plan` (`WorkerCapacity`, `Plan`,
`InfeasiblePlanError`), `rate_model` (stage costs and worker rates), `feasibility` (memory
checks and their errors), `exact` (the optimum of a small fleet), `splits` (starting splits),
`assign` (workers onto the stages of a split), `search` (ranking and refinement) and `patch`
(the minimal fix behind `replan()` and `patch()`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from configs.profile import ModelProfile
from coordinator.planning.feasibility import ensure_holdable
from coordinator.planning.patch import patch_plan
from coordinator.planning.plan import InfeasiblePlanError, Plan, WorkerCapacity, with_note
from coordinator.planning.rate_model import (
    Costs,
    Fleet,
    assignment_array,
    check_boundaries,
    fits_model,
    rate_matrix,
    stage_sums,
)
from coordinator.planning.search import search

__all__ = [
    "patch",
    "InfeasiblePlanError",
    "Plan",
    "WorkerCapacity",
    "evaluate",
    "keep_state_holders",
    "moves",
    "plan",
    "replan",
    "restored_plan",
    "round_robin_plan",
]


def evaluate(profile: ModelProfile, workers: Sequence[WorkerCapacity], boundaries: Sequence[int],
             stage_of: Mapping[str, int]) -> tuple[float, ...]:
    """Tokens/s of each stage of a given plan; an unserved stage rates 0, a misfit adds 0."""
    costs = Costs.for_workers(profile, workers)
    b = check_boundaries(boundaries, costs.n)
    fleet = Fleet(workers)
    assign = assignment_array(fleet, stage_of, len(b) - 1)
    return tuple(float(x) for x in stage_sums(rate_matrix(costs, fleet, b), assign))


def restored_plan(profile: ModelProfile, workers: Sequence[WorkerCapacity], boundaries: Sequence[int],
                  stage_of: Mapping[str, int]) -> Plan:
    """A plan read back from the registry, rated for those of `workers` it places."""
    members = [w for w in workers if w.worker_id in stage_of]
    return Plan(tuple(boundaries), dict(stage_of), evaluate(profile, members, boundaries, stage_of), note="restored")


def round_robin_plan(profile: ModelProfile, workers: Sequence[WorkerCapacity], num_stages: int) -> Plan:
    """The naive baseline: equal layer counts, worker i on stage i mod S, memory ignored."""
    n = profile.n_layer
    if not 1 <= num_stages <= n:
        raise ValueError(f"num_stages must be in [1, {n}] (got {num_stages})")
    sizes = [n // num_stages + (1 if s < n % num_stages else 0) for s in range(num_stages)]
    boundaries = tuple(int(x) for x in np.concatenate([[0], np.cumsum(sizes)]))
    stage_of = {w.worker_id: i % num_stages for i, w in enumerate(workers)}
    rates = evaluate(profile, workers, boundaries, stage_of)
    return Plan(boundaries, stage_of, rates, note=f"round robin over {num_stages} stages")


def moves(old: Plan, new: Plan) -> list[str]:
    """Workers whose stage differs between the plans; a worker a plan leaves out has no stage.

    So newcomers count, and so do workers `new` leaves idle or that have left the fleet.
    """
    changed = [w for w, s in new.stage_of.items() if old.stage_of.get(w) != s]
    return changed + [w for w in old.stage_of if w not in new.stage_of]


def plan(profile: ModelProfile, workers: Sequence[WorkerCapacity], *, min_replicas: int = 2) -> Plan:
    """The fastest plan the search finds: every stage served and every worker's memory respected.

    Stages get at least `min_replicas` workers each (so one departure does not stall the
    pipeline) whenever some split of this fleet allows it; otherwise at least one.
    """
    if min_replicas < 1:
        raise ValueError(f"min_replicas must be >= 1 (got {min_replicas})")
    costs = Costs.for_workers(profile, workers)
    fleet = Fleet(workers)
    ensure_holdable(costs, fleet)
    return search(costs, fleet, min_replicas)


def replan(profile: ModelProfile, workers: Sequence[WorkerCapacity], current: Plan | None, *,
           min_gain: float, min_replicas: int = 2) -> Plan:
    """Keep `current` with minimal fixes unless a fresh plan is more than `min_gain` faster.

    Reshuffling a live swarm costs: moved workers load new layers and their stage state.
    So the current plan is patched (newcomers join where they raise the bottleneck most, an
    unserved stage borrows one worker from where it hurts least) and the fresh optimum is
    adopted only if it beats the patched plan by more than `min_gain` (0.10 = 10%).
    """
    if min_gain < 0:
        raise ValueError(f"min_gain must be >= 0 (got {min_gain})")
    costs = Costs.for_workers(profile, workers)
    fleet = Fleet(workers)
    if current is not None and not fits_model(current, costs.n):
        current = None  # a plan for another model (the config changed): nothing to keep
    if current is None:
        fresh = plan(profile, workers, min_replicas=min_replicas)
        return with_note(fresh, f"first plan: {fresh.note}")
    kept = patch_plan(costs, fleet, current, min_replicas)
    try:
        fresh = plan(profile, workers, min_replicas=min_replicas)
    except InfeasiblePlanError:
        if kept.rate > 0:
            return with_note(kept, f"kept plan: no fresh plan found; {kept.note}")
        raise
    if kept.rate <= 0:
        return with_note(fresh, f"re-planned: the kept plan cannot run ({kept.note}); {fresh.note}")
    gain = fresh.rate / kept.rate - 1
    if gain > min_gain:
        fresh = keep_state_holders(profile, workers, current, fresh)
        return with_note(fresh, f"re-planned: +{gain:.0%} over keeping the plan; {fresh.note}")
    better = f"+{gain:.0%}" if gain >= 0 else "no better"
    return with_note(kept, f"kept plan: best alternative only {better}; {kept.note}")


def keep_state_holders(profile: ModelProfile, workers: Sequence[WorkerCapacity], current: Plan,
                       fresh: Plan) -> Plan:
    """`fresh`, with a worker swapped back wherever it would take a stage from all who hold it.

    A stage's trained parameters live only in its replicas: a newcomer downloads them from one.
    The search places workers without regard to where they are, so a fresh plan with the same
    layers may trade every replica of a stage for others at once, and that stage would restart
    from the seed. For each fresh stage whose layers some current stage holds but none of
    whose workers served them, one former holder (now elsewhere or idle) trades places with
    a newcomer there; the swap keeps team sizes, so the plan's rates barely move.
    """
    stage_of = dict(fresh.stage_of)
    spans = {(current.boundaries[s], current.boundaries[s + 1]): s for s in range(current.num_stages)}
    live = {w.worker_id for w in workers}
    rates = rate_matrix(Costs.for_workers(profile, workers), Fleet(workers), fresh.boundaries)
    row = {w.worker_id: i for i, w in enumerate(workers)}
    for stage in range(fresh.num_stages):
        old = spans.get((fresh.boundaries[stage], fresh.boundaries[stage + 1]))
        if old is None:
            continue  # new layers: nobody holds them
        holders = [w for w, s in current.stage_of.items() if s == old and w in live]
        members = [w for w, s in stage_of.items() if s == stage]
        if not holders or any(w in holders for w in members):
            continue
        for holder in holders:
            away = stage_of.get(holder, -1)
            newcomer = next((w for w in members if away < 0 or rates[row[w], away] > 0), None)
            if newcomer is None or rates[row[holder], stage] <= 0:
                continue
            stage_of[holder] = stage
            if away >= 0:
                stage_of[newcomer] = away
            else:
                del stage_of[newcomer]
            break
    if stage_of == fresh.stage_of:
        return fresh
    rates_now = evaluate(profile, workers, fresh.boundaries, stage_of)
    return Plan(fresh.boundaries, stage_of, rates_now, note=f"{fresh.note}; a holder kept on each stage")


def patch(profile: ModelProfile, workers: Sequence[WorkerCapacity], current: Plan) -> Plan:
    """`current` with the fewest changes that make it run on the live fleet, without searching.

    Cheap (one pass over the fleet), for joins and departures on large swarms, where a full
    `replan` on every event would cost seconds; the full search then runs periodically.
    """
    costs = Costs.for_workers(profile, workers)
    if not fits_model(current, costs.n):
        raise ValueError("current plan does not fit this model; call replan() instead")
    return patch_plan(costs, Fleet(workers), current)
