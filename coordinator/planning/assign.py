"""Which worker serves which stage of a fixed split.

A fresh assignment seeds every stage with the workers it needs, places the rest greedily and
then runs a local search that raises the slowest stage; `reassign` keeps existing teams on a
new split and `kick_search` perturbs an assignment to leave a local optimum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from coordinator.planning.rate_model import EPS, Costs, Fleet, rate_matrix, stage_sums

__all__ = ["Candidate", "assign_fresh", "candidate", "every_stage_served", "kick_search", "reassign"]


# Greedy placement prices stage s at exp(-sharpness * its rate / the rate to expect): a worker
# goes where rate x price is highest, so it favours stages it runs fast on (a link-bound worker
# runs at half speed in the middle, which moves two tensors per token) until they fill up.
# Low sharpness weighs a worker's own speed more, high sharpness the balance; 2-4 does best
# on mixed fleets before local search, which does the fine balancing anyway.
_PRICE_SHARPNESS = 3.0


@dataclass
class Candidate:
    rate: float
    sums: np.ndarray
    boundaries: tuple[int, ...]
    assign: np.ndarray

    def key(self) -> tuple[float, float]:
        # leximin-ish: the slowest stage first, then the total throughput as a tie-break
        return (self.rate, float(self.sums.sum()))


def assign_fresh(costs: Costs, fleet: Fleet, split: tuple[int, ...], req: int,
                 max_steps: int | None = None) -> Candidate:
    rates = rate_matrix(costs, fleet, split)
    flops, mem, _ = costs.stages(split)
    assign = _seed(rates, mem, req)
    _greedy(rates, assign, flops)
    _local_search(rates, assign, req, max_steps)
    return candidate(rates, assign, split)


def candidate(rates: np.ndarray, assign: np.ndarray, split: tuple[int, ...]) -> Candidate:
    sums = stage_sums(rates, assign)
    return Candidate(float(sums.min()), sums, split, assign.copy())


def _seed(rates: np.ndarray, stage_mem: np.ndarray, req: int) -> np.ndarray:
    """Give every stage `req` fitting workers, the most demanding stages first.

    Fits by memory are nested (a worker that holds a bigger stage holds any smaller one), so
    serving stages in decreasing memory need never strands a later stage if any assignment
    exists. Unreachable workers fit stage 0 only, which breaks the nesting: a stage takes the
    workers that fit it alone first, then the fastest.
    """
    assign = np.full(rates.shape[0], -1)
    only_here = (rates > 0).sum(axis=1) == 1
    for s in np.argsort(-stage_mem, kind="stable"):
        free = np.flatnonzero((assign < 0) & (rates[:, s] > 0))
        take = free[np.lexsort((-rates[free, s], ~only_here[free]))[:req]]
        assign[take] = s
    return assign


def _greedy(rates: np.ndarray, assign: np.ndarray, stage_flops: np.ndarray) -> None:
    """Place the remaining workers, strongest first, each where rate x stage price is highest.

    Prices fall exponentially as a stage's rate rises towards the rate the fleet could reach
    (the FLOP/s it can deliver over the FLOPs a token costs end to end): an empty stage is
    attractive to anyone who fits, a full one only to a worker that runs much faster there.
    """
    work = rates * stage_flops[None, :]  # FLOP/s delivered: comparable across stage sizes
    best = work.max(axis=1)
    todo = np.flatnonzero((assign < 0) & (best > 0))
    if len(todo) == 0:
        return
    todo = todo[np.argsort(-best[todo], kind="stable")]
    reachable = float(best.sum() / stage_flops.sum())
    k = _PRICE_SHARPNESS / reachable
    sums = stage_sums(rates, assign)
    if len(todo) <= 1024:
        sums_l = sums.tolist()
        price = [math.exp(-k * x) for x in sums_l]
        picked = []
        for row in rates[todo].tolist():
            value = [r * p for r, p in zip(row, price)]
            s = value.index(max(value))  # the first of equals, as max(key=) would pick
            sums_l[s] += row[s]
            price[s] = math.exp(-k * sums_l[s])
            picked.append(s)
        assign[todo] = picked
        return
    # many workers: a few hundred at a time under one set of prices (each batch is a
    # small share of the fleet, so the prices it would have moved barely move)
    for batch in np.array_split(todo, 256):
        value = rates[batch] * np.exp(-k * (sums - sums.min()))[None, :]
        picked = np.argmax(value, axis=1)
        assign[batch] = picked
        sums += np.bincount(picked, weights=rates[batch, picked], minlength=len(sums))


# Overshoot allowed per unit of imbalance (mean stage rate over the slowest, less one), and
# the fleet size from which it applies (in a small fleet one worker is a large share of a
# stage, and overshooting cost the 100-worker benchmark fleet 3%).
_OVERSHOOT = 0.1
_OVERSHOOT_FLEET = 256


def _local_search(rates: np.ndarray, assign: np.ndarray, req: int, max_steps: int | None = None) -> None:
    """Raise the slowest stage by moving workers into it, or swapping one, while that helps.

    A move is taken only if the slowest stage ends above its old rate and the stage it takes
    from does too, so the sorted stage rates rise lexicographically and the search ends.
    Each step ranks every candidate at once, then takes the best ones in turn while the
    stage is still the slowest (a large fleet needs hundreds of single moves otherwise).
    """
    n_workers, n_stages = rates.shape
    if n_stages == 1:
        assign[(assign < 0) & (rates[:, 0] > 0)] = 0
        return
    if max_steps is None:
        max_steps = 4 * n_workers + 50 if n_workers <= 256 else 1000
    idx = np.arange(n_workers)
    # an extra column n_stages stands for "idle": rate 0, and nothing drops below it by
    # giving a worker away (its sum is infinite), which saves a mask in every step
    ext = np.zeros((n_workers, n_stages + 1))
    ext[:, :n_stages] = rates
    at = np.where(assign < 0, n_stages, assign)
    for _ in range(max_steps):
        here = ext[idx, at]
        sums_x = np.bincount(at, weights=here, minlength=n_stages + 1)
        counts_x = np.bincount(at[here > 0], minlength=n_stages + 1)
        sums, counts = sums_x[:n_stages], counts_x[:n_stages]
        b = int(np.argmin(sums))
        low = float(sums[b])
        floor = low + EPS * max(low, 1e-30)
        # moves: take w from its stage t (or from idle) to b
        sums_x[n_stages] = np.inf
        src_after = sums_x[at] - here
        into = ext[:, b]
        movable = (at != b) & (into > 0) & (src_after > floor) & ((here <= 0) | (counts_x[at] > req))
        gain = np.where(movable, np.minimum(low + into, src_after), -np.inf)
        top = np.flatnonzero(gain > floor)
        if len(top) == 0:
            if not _swap(rates, assign, sums, counts, here, b, floor, req):
                return
            at = np.where(assign < 0, n_stages, assign)
            continue
        if len(top) > 64:
            top = top[np.argpartition(-gain[top], 63)[:64]]
        top = top[np.argsort(-gain[top], kind="stable")]
        sums_l, counts_l = sums.tolist(), counts.tolist()
        # in a large fleet b may rise a little past the next-slowest stage, more while the
        # stages are far apart: otherwise stages tied at the bottom take one worker per step
        # in turn (10,000 workers needed 1,000 steps)
        overshoot = 1.0
        if n_workers > _OVERSHOOT_FLEET:
            overshoot += _OVERSHOOT * max(0.0, float(sums.sum()) / n_stages / max(low, 1e-30) - 1.0)
        for w in top.tolist():
            t = int(assign[w])
            if t >= 0:
                if sums_l[t] - here[w] <= sums_l[b] * (1 + EPS):
                    continue  # t has given enough this step: it would drop to the bottom
                if here[w] > 0 and counts_l[t] <= req:
                    continue
                sums_l[t] -= here[w]
                counts_l[t] -= here[w] > 0
            assign[w] = at[w] = b
            sums_l[b] += rates[w, b]
            counts_l[b] += 1
            if sums_l[b] >= overshoot * min(x for s, x in enumerate(sums_l) if s != b):
                break  # b is no longer the slowest: re-rank from the new bottleneck


_SWAP_PAIRS = 400_000  # pairs one swap step weighs at most
_SWAP_OTHERS = 2_000  # of them, workers outside the slowest stage (10,000 made a step take 18 ms)


def _swap(rates: np.ndarray, assign: np.ndarray, sums: np.ndarray, counts: np.ndarray, here: np.ndarray,
          b: int, floor: float, req: int) -> bool:
    """Exchange a worker of the slowest stage b with one elsewhere, if both stages end above floor."""
    mine = np.flatnonzero(assign == b)
    others = np.flatnonzero((assign >= 0) & (assign != b) & (rates[:, b] > 0))
    if len(mine) == 0 or len(others) == 0:
        return False
    if len(mine) * len(others) > _SWAP_PAIRS:
        # large fleets: the workers that would add most to b, and b's weakest members, are the candidates
        if len(others) > _SWAP_OTHERS:
            others = others[np.argpartition(-rates[others, b], _SWAP_OTHERS - 1)[:_SWAP_OTHERS]]
        mine = mine[np.argsort(rates[mine, b], kind="stable")[: max(1, _SWAP_PAIRS // len(others))]]
    t = assign[others]
    new_b = sums[b] - rates[mine, b][:, None] + rates[others, b][None, :]
    into_t = rates[mine[:, None], t[None, :]]  # u's rate on v's stage
    new_t = sums[t][None, :] - here[others][None, :] + into_t
    keeps_count = (into_t > 0) | (here[others] <= 0)[None, :] | (counts[t] > req)[None, :]
    score = np.where(keeps_count & (new_t > floor), np.minimum(new_b, new_t), -np.inf)
    u, v = np.unravel_index(int(np.argmax(score)), score.shape)
    if score[u, v] <= floor:
        return False
    assign[mine[u]], assign[others[v]] = t[v], b
    return True


def reassign(costs: Costs, fleet: Fleet, assign: np.ndarray, split: tuple[int, ...],
             req: int) -> Candidate:
    """Keep the teams on a new split: workers that no longer fit are freed, then local search."""
    rates = rate_matrix(costs, fleet, split)
    assign = assign.copy()
    on = assign >= 0
    assign[on & (rates[np.arange(len(assign)), np.maximum(assign, 0)] <= 0)] = -1
    _local_search(rates, assign, req)
    return candidate(rates, assign, split)


def kick_search(rates: np.ndarray, cand: Candidate, req: int, rounds: int) -> Candidate:
    """Iterated local search: move a few random workers anywhere they fit, search, keep if better."""
    rng = np.random.default_rng(len(cand.boundaries) * 7919 + rates.shape[0])
    movable = np.flatnonzero(rates.max(axis=1) > 0)
    best = cand
    if len(movable) < 2 or rates.shape[1] < 2:
        return best
    for _ in range(rounds):
        assign = best.assign.copy()
        for w in rng.choice(movable, size=min(len(movable), int(rng.integers(2, 4))), replace=False):
            options = np.flatnonzero((rates[w] > 0) & (np.arange(rates.shape[1]) != assign[w]))
            if len(options):
                assign[w] = rng.choice(options)
        _local_search(rates, assign, req)
        trial = candidate(rates, assign, cand.boundaries)
        if trial.key() > best.key() and every_stage_served(rates, assign, req):
            best = trial
    return best


def every_stage_served(rates: np.ndarray, assign: np.ndarray, req: int) -> bool:
    on = assign >= 0
    fit = on & (rates[np.arange(len(assign)), np.maximum(assign, 0)] > 0)
    return bool(np.bincount(assign[fit], minlength=rates.shape[1]).min() >= req)
