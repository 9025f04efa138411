"""The smallest change that makes a current plan run on the live fleet, without searching.

`replan()` compares this against a fresh plan (hysteresis); `patch()` returns it directly.
"""

from __future__ import annotations

import numpy as np

from coordinator.planning.plan import Plan
from coordinator.planning.rate_model import EPS, Costs, Fleet, rate_matrix, stage_sums

__all__ = ["patch_plan"]


def _lifted(sums: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """The slowest stage's rate after adding `gain[s]` to stage s, for each s (-inf where gain is 0)."""
    order = np.argsort(sums, kind="stable")
    others = np.full(len(sums), sums[order[0]])
    others[order[0]] = sums[order[1]] if len(sums) > 1 else np.inf
    out = np.minimum(others, sums + gain)
    out[gain <= 0] = -np.inf
    return out


def patch_plan(costs: Costs, fleet: Fleet, current: Plan, min_replicas: int = 2) -> Plan:
    """The current plan with the fewest changes that make it run on the live fleet.

    Newcomers fill stages with fewer than `min_replicas` replicas first, as a fresh plan would:
    a stage with one replica stops the whole swarm when that volunteer leaves, and redundancy
    placed at a join costs nothing, while moving someone later costs a state download."""
    split = current.boundaries
    n_stages = len(split) - 1
    rates = rate_matrix(costs, fleet, split)
    idx = np.arange(len(fleet))
    assign = np.full(len(fleet), -1)
    for i, w in enumerate(fleet.workers):
        s = current.stage_of.get(w.worker_id, -1)
        # a worker that restarted (stage -1) or no longer fits its stage is placed afresh
        if w.stage_index != -1 and 0 <= s < n_stages and rates[i, s] > 0:
            assign[i] = s
    placed = 0
    # newcomers, fastest first, each where it lifts the slowest stage most (ties: where it runs
    # fastest), among the stages short of min_replicas that it can serve if there are any
    sums = stage_sums(rates, assign)
    best = rates.max(axis=1)
    newcomers = np.flatnonzero((assign < 0) & (best > 0))
    for i in newcomers[np.argsort(-best[newcomers], kind="stable")]:
        lifted = _lifted(sums, rates[i])
        counts = np.bincount(assign[assign >= 0], minlength=n_stages)
        thin = (counts < min_replicas) & (rates[i] > 0)
        if thin.any():
            lifted[~thin] = -np.inf
        top = np.flatnonzero(lifted >= lifted.max() - EPS * max(abs(lifted.max()), 1e-30))
        s = int(top[np.argmax(rates[i, top])])
        assign[i] = s
        sums[s] += rates[i, s]
        placed += 1
    # a stage nobody serves borrows one worker from where losing it hurts the minimum least
    moved = 0
    for s in range(n_stages):
        here = np.where(assign >= 0, rates[idx, np.maximum(assign, 0)], 0.0)
        counts = np.bincount(assign[(assign >= 0) & (here > 0)], minlength=n_stages)
        if counts[s] > 0:
            continue
        sums = stage_sums(rates, assign)
        donors = np.flatnonzero((assign >= 0) & (rates[:, s] > 0) & (counts[np.maximum(assign, 0)] > 1))
        if len(donors) == 0:
            continue
        t = assign[donors]
        rest = np.delete(np.arange(n_stages), s)
        order = rest[np.argsort(sums[rest], kind="stable")]
        # slowest of the stages other than s and the donor's own
        others = np.where(t == order[0], sums[order[1]] if len(order) > 1 else np.inf, sums[order[0]])
        after = np.minimum(np.minimum(others, sums[t] - here[donors]), sums[s] + rates[donors, s])
        w = int(donors[int(np.argmax(after))])
        assign[w] = s
        moved += 1
    sums = stage_sums(rates, assign)
    live = set(fleet.ids)
    stage_of = {fleet.ids[i]: int(a) for i, a in enumerate(assign) if a >= 0}
    gone = sum(1 for w in current.stage_of if w not in live)
    note = f"{placed} placed, {moved} moved, {gone} gone; {sums.min():,.0f} tokens/s"
    return Plan(split, stage_of, tuple(float(x) for x in sums), note=note)
