"""The search behind `plan()`: rank the starting splits, refine the best, return the winner.

Refinement alternates the optimal boundaries for the teams a candidate has with better teams
for those boundaries, and for the leaders shifts boundaries one layer at a time.
"""

from __future__ import annotations

import numpy as np

from coordinator.planning.assign import Candidate, assign_fresh, every_stage_served, kick_search, reassign
from coordinator.planning.exact import EXACT_MAX_WORKERS, exact_search
from coordinator.planning.feasibility import fragmented
from coordinator.planning.plan import Plan
from coordinator.planning.rate_model import Costs, Fleet, rate_matrix, stage_crossings
from coordinator.planning.splits import splits_by_count

__all__ = ["search"]


# Starting splits are ranked on at most this many workers (a fixed random sample): stage
# rates scale with the fleet, so a sample ranks splits nearly as the whole fleet would.
_RANK_SAMPLE = 384
_RANK_STEPS = 20  # local search steps per split when ranking (the chosen ones search on)
# Layer splits optimized in full after the ranking pass (besides the best of each stage
# count), and rounds of boundary moves and worker moves each.
_REFINE_TOP = 3
_REFINE_ROUNDS = 4
_EXPLORE_TOP = 2
# Fleets up to this size also get perturbation rounds: local search stalls where a better
# plan needs several workers to change places at once, and in a small fleet one worker is
# a large share of a stage. Random kicks (a fixed seed: plans are reproducible) get it out.
_KICK_FLEET = 16
_KICK_ROUNDS = 24


def search(costs: Costs, fleet: Fleet, min_replicas: int) -> Plan:
    """The best plan found for a fleet that `ensure_holdable` has passed: the optimum for a small
    fleet (coordinator.planning.exact), the heuristic search's best for a larger one."""
    if len(fleet) <= EXACT_MAX_WORKERS:
        return _exact_plan(costs, fleet, min_replicas)
    mems_desc = np.sort(fleet.mem)[::-1]
    smallest = costs.mem[1, 2] if costs.n >= 3 else costs.smallest_stage_memory()
    usable = fleet.mem >= smallest
    req = 1
    by_count: dict[int, list[tuple[int, ...]]] = {}
    if min_replicas > 1:
        by_count = splits_by_count(costs, fleet, mems_desc, usable, min_replicas)
        req = min_replicas if by_count else 1
    if req == 1:
        by_count = splits_by_count(costs, fleet, mems_desc, usable, 1)
    if not by_count:
        raise fragmented(costs, fleet)
    splits = [split for group in by_count.values() for split in group]

    # rank every starting split (on a sample of a large fleet), then refine the best few
    scout = fleet if len(fleet) <= _RANK_SAMPLE else fleet.sample(_RANK_SAMPLE)
    ranked = sorted((assign_fresh(costs, scout, split, req, _RANK_STEPS) for split in splits),
                    key=Candidate.key, reverse=True)
    chosen = ranked[:_REFINE_TOP]
    for count in by_count:  # the best of every stage count gets its chance to move boundaries
        top = next(c for c in ranked if len(c.boundaries) == count + 1)
        if all(top is not c for c in chosen):
            chosen.append(top)
    refined = sorted((_refine(costs, scout, cand, req, explore=False) for cand in chosen),
                     key=Candidate.key, reverse=True)
    # shifting boundaries one layer at a time costs a search per shift: only for the leaders
    # (in a small fleet, the leader of every stage count)
    lead = [i for i, c in enumerate(refined) if i < _EXPLORE_TOP or (
        len(scout) <= _KICK_FLEET and all(len(d.boundaries) != len(c.boundaries) for d in refined[:i]))]
    for i in lead:
        refined[i] = _refine(costs, scout, refined[i], req)
    refined.sort(key=Candidate.key, reverse=True)
    if scout is fleet:
        return _to_plan(costs, fleet, refined[0], req, min_replicas)
    # a large fleet: carry the sample's best splits over to the whole fleet
    best = None
    seen: set[tuple[int, ...]] = set()
    for cand in refined:
        if cand.boundaries in seen:
            continue
        seen.add(cand.boundaries)
        full = _refine(costs, fleet, assign_fresh(costs, fleet, cand.boundaries, req), req, explore=False)
        if best is None or full.key() > best.key():
            best = full
        if len(seen) == _REFINE_TOP:
            break
    return _to_plan(costs, fleet, best, req, min_replicas)


def _exact_plan(costs: Costs, fleet: Fleet, min_replicas: int) -> Plan:
    """Replicated stages when some plan has them, as the heuristic's rule is; else any plan."""
    found = exact_search(costs, fleet, min_replicas) if min_replicas > 1 else None
    req = min_replicas if found is not None else 1
    found = found or exact_search(costs, fleet, 1)
    if found is None:
        raise fragmented(costs, fleet)
    return _to_plan(costs, fleet, found, req, min_replicas)


def _refine(costs: Costs, fleet: Fleet, cand: Candidate, req: int, *, explore: bool = True) -> Candidate:
    """Improve a candidate by turns: best boundaries for its teams, better teams for its
    boundaries, and (when `explore`) each boundary shifted by one layer with the teams
    re-searched, both from where they are and from scratch.

    The last catches what the first cannot: a boundary that should move but would push a
    worker out of memory, unless that worker trades places with another at the same time.
    """
    best = reassign(costs, fleet, cand.assign, cand.boundaries, req)  # finish a cut-short search
    if best.key() < cand.key():
        best = cand
    kicks = _KICK_ROUNDS if len(fleet) <= _KICK_FLEET else 0
    for _ in range(_REFINE_ROUNDS):
        improved = False
        split = _best_boundaries(costs, fleet, best.assign, len(best.boundaries) - 1, req)
        if split is not None and split != best.boundaries:
            moved = reassign(costs, fleet, best.assign, split, req)
            if moved.key() > best.key():
                best, improved = moved, True
        if kicks:
            kicked = kick_search(rate_matrix(costs, fleet, best.boundaries), best, req, kicks)
            if kicked.key() > best.key():
                best, improved = kicked, True
        if explore:
            start = best
            for split in _shifted(start.boundaries):
                for trial in (reassign(costs, fleet, start.assign, split, req),
                              assign_fresh(costs, fleet, split, req)):
                    served = every_stage_served(rate_matrix(costs, fleet, split), trial.assign, req)
                    if trial.key() > best.key() and served:
                        best, improved = trial, True
        if not improved:
            break
    return best


def _shifted(split: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Splits one layer away: one inner boundary moved left or right."""
    out = []
    for i in range(1, len(split) - 1):
        for step in (-1, 1):
            b = split[i] + step
            if split[i - 1] < b < split[i + 1]:
                out.append(split[:i] + (b,) + split[i + 1 :])
    return out


def _best_boundaries(costs: Costs, fleet: Fleet, assign: np.ndarray, num_stages: int,
                     req: int) -> tuple[int, ...] | None:
    """The split that maximizes the slowest stage for fixed teams (each stage's workers).

    A stage's rate only falls as it grows, so for a target rate the stages can be laid out
    left to right, each taking as many layers as it can while staying at or above the
    target; the best target is found by bisection over the rates that can occur.
    """
    n = costs.n
    if num_stages == 1:
        return (0, n)
    crossings = stage_crossings(num_stages)
    rows = costs.unique_rows
    tables = []
    for s in range(num_stages):
        team = np.flatnonzero(assign == s)
        if len(team) == 0:
            return None
        r = fleet.rates(rows[:, 0], rows[:, 1], rows[:, 2], np.full(len(rows), crossings[s]), rows=team,
                        first=np.full(len(rows), s == 0))
        per_row = r.sum(axis=0)
        per_row[(r > 0).sum(axis=0) < req] = 0.0  # a stage must keep req fitting workers
        table = np.where(costs.pair_to_row >= 0, per_row[np.maximum(costs.pair_to_row, 0)], 0.0)
        tables.append(table.tolist())
    targets = np.unique([v for t in tables for row in t for v in row if v > 0])

    def layout(target: float) -> tuple[int, ...] | None:
        pos, bounds = 0, [0]
        for s in range(num_stages - 1):
            t = tables[s][pos]
            last = n - (num_stages - 1 - s)
            if pos + 1 > last or t[pos + 1] < target:
                return None
            end = pos + 1
            while end + 1 <= last and t[end + 1] >= target:
                end += 1
            bounds.append(end)
            pos = end
        if tables[-1][pos][n] < target:
            return None
        bounds.append(n)
        return tuple(bounds)

    lo, hi, found = 0, len(targets) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        split = layout(float(targets[mid]))
        if split is None:
            hi = mid - 1
        else:
            found, lo = split, mid + 1
    return found


def _to_plan(costs: Costs, fleet: Fleet, cand: Candidate, req: int, min_replicas: int) -> Plan:
    split = cand.boundaries
    rates = rate_matrix(costs, fleet, split)
    assign = cand.assign.copy()
    on = assign >= 0
    assign[on & (rates[np.arange(len(fleet)), np.maximum(assign, 0)] <= 0)] = -1  # fits nowhere: idle
    stage_of = {fleet.ids[i]: int(s) for i, s in enumerate(assign) if s >= 0}
    sizes = [b - a for a, b in zip(split, split[1:])]
    counts = np.bincount(assign[assign >= 0], minlength=len(sizes))
    slowest = int(np.argmin(cand.sums))
    idle = len(fleet) - len(stage_of)
    parts = [
        f"{len(sizes)} stage{'s' if len(sizes) != 1 else ''} of {'/'.join(map(str, sizes))} layers",
        f"workers per stage {'/'.join(map(str, counts.tolist()))}",
        f"{cand.rate:,.0f} tokens/s, slowest stage {slowest}",
    ]
    if req < min_replicas:
        parts.append(f"too few workers for {min_replicas} replicas per stage")
    if idle:
        parts.append(f"{idle} worker{'s' if idle != 1 else ''} fit no stage")
    return Plan(split, stage_of, tuple(float(x) for x in cand.sums), note="; ".join(parts))
