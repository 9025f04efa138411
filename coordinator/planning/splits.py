"""Starting layer splits for the search: per stage count, the balanced split and splits shaped
by the fleet's memory, each kept only if every stage can get enough workers that fit it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import numpy as np

from coordinator.planning.feasibility import hall_ok
from coordinator.planning.rate_model import Costs, Fleet

__all__ = ["splits_by_count"]


def _cap_split(costs: Costs, caps: Sequence[float]) -> tuple[int, ...] | None:
    """Boundaries where stage i fits caps[i]: each stage takes as many layers as fit."""
    n, s_count = costs.n, len(caps)
    pos, bounds = 0, [0]
    for s, cap in enumerate(caps):
        if s == s_count - 1:
            if costs.mem[pos, n] > cap:
                return None
            bounds.append(n)
            break
        last = n - (s_count - 1 - s)
        if pos + 1 > last or costs.mem[pos, pos + 1] > cap:
            return None
        end = pos + 1
        while end + 1 <= last and costs.mem[pos, end + 1] <= cap:
            end += 1
        bounds.append(end)
        pos = end
    return tuple(bounds)


def _balanced_split(costs: Costs, num_stages: int) -> tuple[int, ...]:
    """Equal training cost per stage, counting the embedding and head (minimizes the largest)."""
    n = costs.n
    cum = costs.flops[0, 1:]  # cost of [0, i) for i = 1..n, embedding included (head at n)
    total = float(costs.flops[0, n])
    bounds = [0]
    for k in range(1, num_stages):
        target = total * k / num_stages
        lo, hi = bounds[-1] + 1, n - (num_stages - k)
        i = int(np.argmin(np.abs(cum[lo - 1 : hi] - target))) + lo
        bounds.append(i)
    bounds.append(n)
    # nudge: the rounding above can leave one stage a layer heavier than a cap split would
    best = tuple(bounds)
    worst = float(costs.stages(best)[1].max())
    caps = np.unique(costs.mem[costs.valid])
    lo, hi = 0, int(np.searchsorted(caps, worst))
    while lo < hi:  # smallest cap a greedy split fits under
        mid = (lo + hi) // 2
        if _cap_split(costs, [caps[mid]] * num_stages) is None:
            lo = mid + 1
        else:
            hi = mid
    if caps[lo] < worst:
        alt = _cap_split(costs, [caps[lo]] * num_stages)
        if alt is not None:
            return alt
    return best


def _initial_splits(costs: Costs, mems_desc: np.ndarray, num_stages: int, req: int) -> list[tuple[int, ...]]:
    """Starting splits for one stage count: the balanced one, and ones shaped by the fleet's memory.

    The balanced split minimizes the largest stage, but a fleet with a few big and many small
    cards may do better with big stages for the big cards and small ones for the rest. Those
    splits come from memory caps taken off the sorted fleet and laid out in a few orders.
    """
    if num_stages * req > len(mems_desc):
        return []
    found: list[tuple[int, ...]] = []
    balanced = _balanced_split(costs, num_stages)
    if hall_ok(costs.stages(balanced)[1], mems_desc, req):
        found.append(balanced)
    if num_stages == 1:
        return found
    cap_sets = [mems_desc[np.arange(1, num_stages + 1) * req - 1]]  # tightest caps the fleet allows
    smallest = costs.mem[1, 2] if costs.n >= 3 else costs.smallest_stage_memory()
    fitting = mems_desc[mems_desc >= smallest]
    if len(fitting) >= num_stages * req:  # equal-count groups: the smallest cards get a stage too
        groups = np.array_split(fitting, num_stages)
        cap_sets.append(np.array([g[-1] for g in groups]))
    for caps in cap_sets:
        desc = list(np.sort(caps)[::-1])
        if num_stages <= 4:
            orders: Iterable[Sequence[float]] = set(itertools.permutations(desc))
        else:  # big cards first, last, or at both ends (they carry the embedding and head)
            ends = desc[0::2] + desc[1::2][::-1]
            orders = [desc, desc[::-1], ends]
        for order in sorted(orders):
            split = _cap_split(costs, order)
            if split is not None and split not in found and hall_ok(costs.stages(split)[1], mems_desc, req):
                found.append(split)
    return found


def splits_by_count(costs: Costs, fleet: Fleet, mems_desc: np.ndarray, usable: np.ndarray,
                    req: int) -> dict[int, list[tuple[int, ...]]]:
    """Starting splits per stage count, from the fewest stages memory allows up to where more
    stages stop helping: once every usable worker fits every stage, extra stages only add traffic."""
    out: dict[int, list[tuple[int, ...]]] = {}
    usable_mem = fleet.mem[usable]
    for s in range(1, min(costs.n, len(mems_desc) // req) + 1):
        splits = _initial_splits(costs, mems_desc, s, req)
        if splits:
            out[s] = splits
            largest = costs.stages(_balanced_split(costs, s))[1].max()
            if np.all(usable_mem >= largest):
                break
    return out
