"""The optimal plan of a small fleet, by dynamic programming over layer prefixes and worker subsets.

A plan is a sequence of stages [l, l') that cover the layers, each served by a disjoint team of
workers; its rate is its slowest stage's (the sum of its team's rates), and the rate of a worker
on a stage depends only on the stage's layers and on whether it is the first, a middle or the
last stage (`stage_crossings`). So the best plan of the layers [0, l') with the workers of
`used` is the best, over the last stage [l, l') and its team `team`, of
min(best(l, used - team), rate of `team` on [l, l')). With W workers there are
(n + 1) * 2^W states and every layer pair visits 3^W (prefix team, last team) pairs:
8 workers on GPT-J's 28 layers take about 406 * 6,561 steps, a few tens of milliseconds in
arrays. Past EXACT_MAX_WORKERS the heuristic search (coordinator.planning.search) plans alone.
"""

from __future__ import annotations

import functools

import numpy as np

from coordinator.planning.assign import Candidate, candidate
from coordinator.planning.rate_model import Costs, Fleet, rate_matrix

__all__ = ["EXACT_MAX_WORKERS", "exact_search"]

EXACT_MAX_WORKERS = 8  # 3^8 = 6,561 team pairs per layer pair; 3^10 would be 9x more


@functools.cache
def _subset_pairs(count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (mask, sub) with sub a non-empty subset of mask, sorted by mask; with the start of
    each mask's run (for np.maximum.reduceat). Mask 0, which has no non-empty subset, is left out."""
    every = np.arange(1 << count)
    mask, sub = (a.ravel() for a in np.meshgrid(every, every, indexing="ij"))
    keep = (sub != 0) & (sub & ~mask == 0)
    m, s = mask[keep], sub[keep]
    starts = np.flatnonzero(np.r_[True, m[1:] != m[:-1]])
    return m, s, starts


def _team_sums(rates: np.ndarray, req: int) -> np.ndarray:
    """For every team (a bit mask over the workers): its summed rate on each stage (columns of
    `rates`), or -inf where a member cannot hold the stage or the team has fewer than `req`."""
    count = rates.shape[0]
    bits = ((np.arange(1 << count)[:, None] >> np.arange(count)[None, :]) & 1).astype(float)  # teams x workers
    sums = bits @ rates  # float matrices: numpy's integer matmul is a slow loop
    fitting = bits @ (rates > 0).astype(float)
    size = bits.sum(axis=1)[:, None]
    return np.where((fitting == size) & (size >= req), sums, -np.inf)


def exact_search(costs: Costs, fleet: Fleet, req: int) -> Candidate | None:
    """The fastest plan in which every stage has at least `req` workers that fit it (None if
    there is none); workers the optimum leaves idle then join the stage they help most."""
    count, n = len(fleet), costs.n
    if count > EXACT_MAX_WORKERS:
        raise ValueError(f"exact search is for at most {EXACT_MAX_WORKERS} workers (got {count})")
    masks, subs, starts = _subset_pairs(count)
    rest = masks ^ subs
    best = np.full((n + 1, 1 << count), -np.inf)
    best[0, 0] = np.inf  # no layers placed yet, nobody used: no stage to be slow
    pairs = [(start, end) for end in range(1, n + 1) for start in range(end)]
    team_sums = _team_sums(_stage_rates(costs, fleet, pairs), req)  # teams x pairs
    teams = {pair: team_sums[:, i] for i, pair in enumerate(pairs)}
    for start, end in pairs:  # by end: every prefix a stage extends is final when it is read
        if best[start].max() == -np.inf:
            continue  # no plan reaches this layer
        value = np.minimum(best[start][rest], teams[(start, end)][subs])
        reached = np.maximum.reduceat(value, starts)
        best[end, masks[starts]] = np.maximum(best[end, masks[starts]], reached)
    final = best[n]
    top = int(np.argmax(final))
    if not np.isfinite(final[top]) or final[top] <= 0:
        return None
    stages = _backtrack(best, teams, n, top)
    boundaries = tuple([0] + [end for _, end, _ in stages])
    assign = np.full(count, -1)
    for index, (_, _, team) in enumerate(stages):
        assign[[w for w in range(count) if team >> w & 1]] = index
    rates = rate_matrix(costs, fleet, boundaries)
    _place_idle(rates, assign)
    return candidate(rates, assign, boundaries)


def _stage_rates(costs: Costs, fleet: Fleet, pairs: list[tuple[int, int]]) -> np.ndarray:
    """Every worker's rate (rows) on every stage [start, end) (columns), priced in its place:
    the whole model (no boundary), the first or the last stage (one), a middle stage (two)."""
    start, end = (np.array(x) for x in zip(*pairs, strict=True))
    ends = (start == 0).astype(int) + (end == costs.n)
    crossings = np.select([ends == 2, ends == 1], [0.0, 1.0], 2.0)
    return fleet.rates(costs.flops[start, end], costs.mem[start, end], costs.act[start, end], crossings,
                       first=start == 0)


def _backtrack(best: np.ndarray, teams: dict[tuple[int, int], np.ndarray], end: int,
               mask: int) -> list[tuple[int, int, int]]:
    """The stages (start, end, team) of the plan behind best[end, mask], first stage first."""
    stages = []
    while end > 0:
        target = best[end, mask]
        found = None
        sub = mask
        while sub and found is None:
            for start in range(end):
                sums = teams.get((start, end))
                if sums is not None and min(best[start, mask ^ sub], sums[sub]) == target:
                    found = (start, sub)
                    break
            sub = (sub - 1) & mask
        assert found is not None, "the table holds a value no stage explains"
        start, sub = found
        stages.append((start, end, sub))
        end, mask = start, mask ^ sub
    return stages[::-1]


def _place_idle(rates: np.ndarray, assign: np.ndarray) -> None:
    """Idle workers that fit a stage join the slowest one they fit: the slowest stage can only
    get faster, and the swarm's total rises (Candidate.key's tie-break)."""
    placed = np.flatnonzero(assign >= 0)
    sums = np.bincount(assign[placed], weights=rates[placed, assign[placed]], minlength=rates.shape[1])
    for w in np.argsort(-rates.max(axis=1)):
        if assign[w] >= 0 or rates[w].max() <= 0:
            continue
        fits = np.flatnonzero(rates[w] > 0)
        stage = int(fits[np.argmin(sums[fits])])
        assign[w] = stage
        sums[stage] += rates[w, stage]
