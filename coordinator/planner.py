"""Pipeline planning: how many stages, which layers each holds, which worker serves which stage.

Pure functions over numbers: the coordinator hands in the model's cost profile and what each
live worker can do, and gets back a `Plan`. Nothing here touches the network or the disk.

The model of the swarm (kept deliberately simple, because every input is an estimate):

* A worker on stage [start, end) trains `min(compute rate, link rate)` tokens per second.
  Compute rate = achieved FLOP/s / the stage's training FLOPs per token. Link rate = the
  slower direction of its link / the bytes per token it must move across stage boundaries:
  a middle stage sends activations forward and gradients backward (2 crossings), the first
  and last stage 1, a single-stage plan none. A worker whose memory cannot hold the stage's
  weights, gradients and optimizer state contributes nothing there.
* Replicas of a stage split its tokens, so a stage's rate is the sum of its workers' rates,
  and the pipeline runs at the rate of its slowest stage.

`plan()` maximizes that slowest-stage rate. The problem is a max-min partition (NP-hard in
general), so it is searched, not solved:

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

On fleets small enough to solve exhaustively it lands within a few percent of the optimum
(tests/unit/test_planner.py); 10,000 workers plan in well under a second
(tests/benchmarks/bench_planner.py). `replan()` adds hysteresis so that a live swarm is
not reshuffled for small gains.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from configs.profile import ModelProfile

__all__ = [
    "InfeasiblePlanError",
    "Plan",
    "WorkerCapacity",
    "evaluate",
    "moves",
    "plan",
    "replan",
    "round_robin_plan",
]

# Greedy placement prices stage s at exp(-sharpness * its rate / the rate to expect): a worker
# goes where rate x price is highest, so it favours stages it runs fast on (a link-bound worker
# runs at half speed in the middle, which moves two tensors per token) until they fill up.
# Low sharpness weighs a worker's own speed more, high sharpness the balance; 2-4 does best
# on mixed fleets before local search, which does the fine balancing anyway.
_PRICE_SHARPNESS = 3.0
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
# Relative slack under which two rates count as equal (they are float sums).
_EPS = 1e-9


@dataclass(frozen=True)
class WorkerCapacity:
    """What the planner needs to know about one live worker."""

    worker_id: str
    achieved_flops: float  # FLOP/s it sustained on its benchmark, not the datasheet peak
    memory_bytes: int  # what training may use of its accelerator
    upload_bps: float  # bits per second
    download_bps: float
    # compressed / raw bytes of the heaviest activation codec the policy allows this worker
    activation_compression_ratio: float = 1.0
    stage_index: int = -1  # the stage it serves now, -1 if none

    def __post_init__(self) -> None:
        if not 0 < self.activation_compression_ratio <= 1:
            raise ValueError(
                f"{self.worker_id}: activation_compression_ratio must be in (0, 1] "
                f"(got {self.activation_compression_ratio})"
            )
        for name in ("achieved_flops", "memory_bytes", "upload_bps", "download_bps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{self.worker_id}: {name} must be >= 0 (got {getattr(self, name)})")


@dataclass(frozen=True)
class Plan:
    boundaries: tuple[int, ...]  # S + 1 layer indices, 0 first and n_layer last
    stage_of: dict[str, int] = field(hash=False)  # worker id -> stage; idle workers are absent
    stage_rates: tuple[float, ...]  # trained tokens/s each stage sustains
    note: str = ""

    @property
    def num_stages(self) -> int:
        return len(self.boundaries) - 1

    @property
    def rate(self) -> float:
        """Tokens per second of the whole pipeline: its slowest stage."""
        return min(self.stage_rates) if self.stage_rates else 0.0

    def layers(self, stage: int) -> range:
        return range(self.boundaries[stage], self.boundaries[stage + 1])

    def workers_on(self, stage: int) -> list[str]:
        return [w for w, s in self.stage_of.items() if s == stage]


class InfeasiblePlanError(Exception):
    """The live workers cannot hold the model in any split; the message says by how much."""


# ----------------------------------------------------------------------------- model costs


class _Costs:
    """Training cost of every possible stage [start, end), as (n+1) x (n+1) arrays.

    Built once per call from prefix sums, so a candidate split is priced by indexing
    instead of summing `LayerCost`s again.
    """

    def __init__(self, profile: ModelProfile) -> None:
        n = profile.n_layer
        if n < 1:
            raise ValueError("the model profile has no blocks")
        self.n = n
        blocks = profile.blocks
        pf = np.concatenate([[0.0], np.cumsum([b.train_flops_per_token for b in blocks], dtype=float)])
        pm = np.concatenate([[0.0], np.cumsum([b.train_memory_bytes for b in blocks], dtype=float)])
        start = np.arange(n + 1)[:, None]
        end = np.arange(n + 1)[None, :]
        at_start = (start == 0).astype(float)
        at_end = (end == n).astype(float)
        self.flops = pf[None, :] - pf[:, None] + at_start * profile.embedding.train_flops_per_token
        self.flops += at_end * profile.head.train_flops_per_token
        self.mem = pm[None, :] - pm[:, None] + at_start * profile.embedding.train_memory_bytes
        self.mem += at_end * profile.head.train_memory_bytes
        # the widest tensor a stage's boundary carries (LayerCost.__add__ takes the max)
        act = np.zeros((n + 1, n + 1))
        for i in range(n):
            widest = blocks[i].activation_bytes_per_token
            if i == 0:
                widest = max(widest, profile.embedding.activation_bytes_per_token)
            for j in range(i + 1, n + 1):
                widest = max(widest, blocks[j - 1].activation_bytes_per_token)
                act[i, j] = max(widest, profile.head.activation_bytes_per_token) if j == n else widest
        self.act = act
        self.valid = end > start
        self.total_memory = float(self.mem[0, n])
        self.params = profile.total.params
        # distinct stage costs: with identical blocks a stage is priced by its length and
        # whether it holds the embedding or the head, so ~4n rows instead of n^2 / 2
        si, ei = np.nonzero(self.valid)
        rows = np.stack([self.flops[si, ei], self.mem[si, ei], self.act[si, ei]], axis=1)
        self.unique_rows, inverse = np.unique(rows, axis=0, return_inverse=True)
        self.pair_to_row = np.full((n + 1, n + 1), -1)
        self.pair_to_row[si, ei] = inverse.ravel()

    def stages(self, boundaries: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        b = np.asarray(boundaries)
        return self.flops[b[:-1], b[1:]], self.mem[b[:-1], b[1:]], self.act[b[:-1], b[1:]]

    def smallest_stage_memory(self) -> float:
        """Memory of the cheapest stage any plan must still place (one block, or an end)."""
        n = self.n
        if n == 1:
            return self.total_memory
        return float(max(self.mem[0, 1], self.mem[n - 1, n]))


def _crossings(num_stages: int) -> np.ndarray:
    """Tensors per token a stage moves over its links: 1 at the ends, 2 in the middle."""
    if num_stages == 1:
        return np.zeros(1)
    k = np.full(num_stages, 2.0)
    k[0] = k[-1] = 1.0
    return k


# ----------------------------------------------------------------------------- the fleet


class _Fleet:
    def __init__(self, workers: Sequence[WorkerCapacity]) -> None:
        ids = [w.worker_id for w in workers]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"duplicate worker ids: {', '.join(dup[:5])}")
        self.workers = list(workers)
        self.ids = ids
        self.flops = np.array([w.achieved_flops for w in workers], dtype=float)
        self.mem = np.array([w.memory_bytes for w in workers], dtype=float)
        # bytes per second of the slower direction: every boundary tensor goes both ways
        self.link = np.array([min(w.upload_bps, w.download_bps) / 8 for w in workers], dtype=float)
        self.ratio = np.array([w.activation_compression_ratio for w in workers], dtype=float)

    def sample(self, size: int) -> _Fleet:
        """A fixed pseudo-random subset (the same fleet always gives the same sample)."""
        rows = np.sort(np.random.default_rng(len(self.ids)).choice(len(self.ids), size, replace=False))
        return _Fleet([self.workers[i] for i in rows])

    def __len__(self) -> int:
        return len(self.ids)

    def rates(self, flops: np.ndarray, mem: np.ndarray, act: np.ndarray, crossings: np.ndarray,
              rows: np.ndarray | None = None) -> np.ndarray:
        """Tokens/s of each worker (rows) on each stage (columns) given the stages' costs."""
        sel = slice(None) if rows is None else rows
        with np.errstate(divide="ignore"):
            compute = self.flops[sel, None] / flops[None, :]
            traffic = act[None, :] * crossings[None, :] * self.ratio[sel, None]
            link = np.where(traffic > 0, self.link[sel, None] / np.where(traffic > 0, traffic, 1.0), np.inf)
        rate = np.minimum(compute, link)
        rate[self.mem[sel, None] < mem[None, :]] = 0.0
        return rate


def _rate_matrix(costs: _Costs, fleet: _Fleet, boundaries: Sequence[int]) -> np.ndarray:
    f, m, a = costs.stages(boundaries)
    return fleet.rates(f, m, a, _crossings(len(boundaries) - 1))


def _stage_sums(rates: np.ndarray, assign: np.ndarray) -> np.ndarray:
    on = assign >= 0
    mine = rates[np.flatnonzero(on), assign[on]]
    return np.bincount(assign[on], weights=mine, minlength=rates.shape[1])


def _check_boundaries(boundaries: Sequence[int], n: int) -> tuple[int, ...]:
    b = tuple(int(x) for x in boundaries)
    if len(b) < 2 or b[0] != 0 or b[-1] != n or any(x >= y for x, y in zip(b, b[1:])):
        raise ValueError(f"boundaries must rise strictly from 0 to n_layer={n} (got {list(b)})")
    return b


# ----------------------------------------------------------------------------- public API


def evaluate(profile: ModelProfile, workers: Sequence[WorkerCapacity], boundaries: Sequence[int],
             stage_of: Mapping[str, int]) -> tuple[float, ...]:
    """Tokens/s of each stage of a given plan; an unserved stage rates 0, a misfit adds 0."""
    costs = _Costs(profile)
    b = _check_boundaries(boundaries, costs.n)
    fleet = _Fleet(workers)
    assign = _assignment_array(fleet, stage_of, len(b) - 1)
    return tuple(float(x) for x in _stage_sums(_rate_matrix(costs, fleet, b), assign))


def _assignment_array(fleet: _Fleet, stage_of: Mapping[str, int], num_stages: int) -> np.ndarray:
    assign = np.full(len(fleet), -1)
    for i, wid in enumerate(fleet.ids):
        s = stage_of.get(wid, -1)
        if s >= num_stages or s < -1:
            raise ValueError(f"worker {wid} is on stage {s}, but the plan has {num_stages} stages")
        assign[i] = s
    return assign


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
    costs = _Costs(profile)
    fleet = _Fleet(workers)
    _ensure_holdable(costs, fleet)
    return _search(costs, fleet, min_replicas)


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
    costs = _Costs(profile)
    fleet = _Fleet(workers)
    if current is not None and not _fits_model(current, costs.n):
        current = None  # a plan for another model (the config changed): nothing to keep
    if current is None:
        fresh = plan(profile, workers, min_replicas=min_replicas)
        return _with_note(fresh, f"first plan: {fresh.note}")
    kept = _patch(costs, fleet, current)
    try:
        fresh = plan(profile, workers, min_replicas=min_replicas)
    except InfeasiblePlanError:
        if kept.rate > 0:
            return _with_note(kept, f"kept plan: no fresh plan found; {kept.note}")
        raise
    if kept.rate <= 0:
        return _with_note(fresh, f"re-planned: the kept plan cannot run ({kept.note}); {fresh.note}")
    gain = fresh.rate / kept.rate - 1
    if gain > min_gain:
        return _with_note(fresh, f"re-planned: +{gain:.0%} over keeping the plan; {fresh.note}")
    better = f"+{gain:.0%}" if gain >= 0 else "no better"
    return _with_note(kept, f"kept plan: best alternative only {better}; {kept.note}")


def patch(profile: ModelProfile, workers: Sequence[WorkerCapacity], current: Plan) -> Plan:
    """`current` with the fewest changes that make it run on the live fleet, without searching.

    Cheap (one pass over the fleet), for joins and departures on large swarms, where a full
    `replan` on every event would cost seconds; the full search then runs periodically.
    """
    costs = _Costs(profile)
    if not _fits_model(current, costs.n):
        raise ValueError("current plan does not fit this model; call replan() instead")
    return _patch(costs, _Fleet(workers), current)


def _fits_model(p: Plan, n_layer: int) -> bool:
    try:
        _check_boundaries(p.boundaries, n_layer)
    except ValueError:
        return False
    return True


def _with_note(p: Plan, note: str) -> Plan:
    return Plan(p.boundaries, p.stage_of, p.stage_rates, note)


# ----------------------------------------------------------------------------- feasibility


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f} GB"


def _ensure_holdable(costs: _Costs, fleet: _Fleet) -> None:
    """Raise with numbers when no split can place the model on these workers at all."""
    need = costs.total_memory
    what = f"the model ({costs.params / 1e9:.2f}B parameters)"
    if len(fleet) == 0:
        raise InfeasiblePlanError(
            f"no live workers: training {what} needs {_gb(need)} of accelerator memory across "
            f"stages, and even the smallest first or last stage needs {_gb(costs.smallest_stage_memory())} "
            f"on one worker: start workers and let them join"
        )
    mems = np.sort(fleet.mem)[::-1]
    shown = ", ".join(_gb(m) for m in mems[:8]) + (f" and {len(mems) - 8} more" if len(mems) > 8 else "")
    have = f"the {len(mems)} live worker{'s' if len(mems) != 1 else ''} ha{'ve' if len(mems) != 1 else 's'}"
    n = costs.n
    one_block = float(costs.mem[1, 2]) if n >= 3 else costs.smallest_stage_memory()
    ends = costs.smallest_stage_memory()
    if mems[0] < ends:
        raise InfeasiblePlanError(
            f"the fleet cannot hold {what}: one layer alone needs {_gb(one_block)} to train and the "
            f"first or last stage (with the embedding or the head) at least {_gb(ends)}, but the largest "
            f"worker has {_gb(mems[0])} ({have} {shown}): add workers with more memory"
        )
    if mems.sum() < need:
        raise InfeasiblePlanError(
            f"the fleet cannot hold {what}: training needs {_gb(need)} across stages but {have} "
            f"{_gb(mems.sum())} in total ({shown}): add workers with at least "
            f"{_gb(need - mems.sum())} more memory between them"
        )


def _hall_ok(stage_mem: np.ndarray, mems_desc: np.ndarray, req: int) -> bool:
    """Can every stage get `req` distinct workers that fit it? (Nested fits: sort and compare.)"""
    need = np.sort(stage_mem)[::-1]
    if len(need) * req > len(mems_desc):
        return False
    return bool(np.all(mems_desc[np.arange(1, len(need) + 1) * req - 1] >= need))


def _cap_split(costs: _Costs, caps: Sequence[float]) -> tuple[int, ...] | None:
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


def _balanced_split(costs: _Costs, num_stages: int) -> tuple[int, ...]:
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


def _fragmented(costs: _Costs, fleet: _Fleet) -> InfeasiblePlanError:
    """Enough memory in total, but no split gives every stage a worker it fits in."""
    mems = np.sort(fleet.mem)[::-1]
    shown = ", ".join(_gb(m) for m in mems[:8]) + (f" and {len(mems) - 8} more" if len(mems) > 8 else "")
    n = costs.n
    middle = costs.mem[1, 2:n] if n >= 3 else np.array([costs.total_memory])
    largest = int(np.count_nonzero(middle <= mems[0]))
    return InfeasiblePlanError(
        f"the fleet cannot hold the model ({costs.params / 1e9:.2f}B parameters): training needs "
        f"{_gb(costs.total_memory)} across stages and the {len(mems)} live workers have "
        f"{_gb(mems.sum())} in total ({shown}), but no split into at most {min(n, len(mems))} stages "
        f"gives every stage its own worker that fits it (the largest worker holds {largest} middle "
        f"layers): add workers with more memory or use a model with fewer or smaller layers"
    )


def _initial_splits(costs: _Costs, mems_desc: np.ndarray, num_stages: int, req: int) -> list[tuple[int, ...]]:
    """Starting splits for one stage count: the balanced one, and ones shaped by the fleet's memory.

    The balanced split minimizes the largest stage, but a fleet with a few big and many small
    cards may do better with big stages for the big cards and small ones for the rest. Those
    splits come from memory caps taken off the sorted fleet and laid out in a few orders.
    """
    if num_stages * req > len(mems_desc):
        return []
    found: list[tuple[int, ...]] = []
    balanced = _balanced_split(costs, num_stages)
    if _hall_ok(costs.stages(balanced)[1], mems_desc, req):
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
            if split is not None and split not in found and _hall_ok(costs.stages(split)[1], mems_desc, req):
                found.append(split)
    return found


# ----------------------------------------------------------------------------- the search


@dataclass
class _Candidate:
    rate: float
    sums: np.ndarray
    boundaries: tuple[int, ...]
    assign: np.ndarray

    def key(self) -> tuple[float, float]:
        # leximin-ish: the slowest stage first, then the total throughput as a tie-break
        return (self.rate, float(self.sums.sum()))


def _search(costs: _Costs, fleet: _Fleet, min_replicas: int) -> Plan:
    mems_desc = np.sort(fleet.mem)[::-1]
    smallest = costs.mem[1, 2] if costs.n >= 3 else costs.smallest_stage_memory()
    usable = fleet.mem >= smallest
    req = 1
    by_count: dict[int, list[tuple[int, ...]]] = {}
    if min_replicas > 1:
        by_count = _splits_by_count(costs, fleet, mems_desc, usable, min_replicas)
        req = min_replicas if by_count else 1
    if req == 1:
        by_count = _splits_by_count(costs, fleet, mems_desc, usable, 1)
    if not by_count:
        raise _fragmented(costs, fleet)
    splits = [split for group in by_count.values() for split in group]

    # rank every starting split (on a sample of a large fleet), then refine the best few
    scout = fleet if len(fleet) <= _RANK_SAMPLE else fleet.sample(_RANK_SAMPLE)
    ranked = sorted((_assign_fresh(costs, scout, split, req, _RANK_STEPS) for split in splits),
                    key=_Candidate.key, reverse=True)
    chosen = ranked[:_REFINE_TOP]
    for count in by_count:  # the best of every stage count gets its chance to move boundaries
        top = next(c for c in ranked if len(c.boundaries) == count + 1)
        if all(top is not c for c in chosen):
            chosen.append(top)
    refined = sorted((_refine(costs, scout, cand, req, explore=False) for cand in chosen),
                     key=_Candidate.key, reverse=True)
    # shifting boundaries one layer at a time costs a search per shift: only for the leaders
    # (in a small fleet, the leader of every stage count)
    lead = [i for i, c in enumerate(refined) if i < _EXPLORE_TOP or (
        len(scout) <= _KICK_FLEET and all(len(d.boundaries) != len(c.boundaries) for d in refined[:i]))]
    for i in lead:
        refined[i] = _refine(costs, scout, refined[i], req)
    refined.sort(key=_Candidate.key, reverse=True)
    if scout is fleet:
        return _to_plan(costs, fleet, refined[0], req, min_replicas)
    # a large fleet: carry the sample's best splits over to the whole fleet
    best = None
    seen: set[tuple[int, ...]] = set()
    for cand in refined:
        if cand.boundaries in seen:
            continue
        seen.add(cand.boundaries)
        full = _refine(costs, fleet, _assign_fresh(costs, fleet, cand.boundaries, req), req, explore=False)
        if best is None or full.key() > best.key():
            best = full
        if len(seen) == _REFINE_TOP:
            break
    return _to_plan(costs, fleet, best, req, min_replicas)


def _splits_by_count(costs: _Costs, fleet: _Fleet, mems_desc: np.ndarray, usable: np.ndarray,
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


def _assign_fresh(costs: _Costs, fleet: _Fleet, split: tuple[int, ...], req: int,
                  max_steps: int | None = None) -> _Candidate:
    rates = _rate_matrix(costs, fleet, split)
    flops, mem, _ = costs.stages(split)
    assign = _seed(rates, mem, req)
    _greedy(rates, assign, flops)
    _local_search(rates, assign, req, max_steps)
    return _candidate(rates, assign, split)


def _candidate(rates: np.ndarray, assign: np.ndarray, split: tuple[int, ...]) -> _Candidate:
    sums = _stage_sums(rates, assign)
    return _Candidate(float(sums.min()), sums, split, assign.copy())


def _seed(rates: np.ndarray, stage_mem: np.ndarray, req: int) -> np.ndarray:
    """Give every stage `req` fitting workers, the most demanding stages first.

    Fits are nested (a worker that holds a bigger stage holds any smaller one), so serving
    stages in decreasing memory need never strands a later stage if any assignment exists.
    """
    assign = np.full(rates.shape[0], -1)
    for s in np.argsort(-stage_mem, kind="stable"):
        free = np.flatnonzero((assign < 0) & (rates[:, s] > 0))
        take = free[np.argsort(-rates[free, s], kind="stable")[:req]]
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
    sums = _stage_sums(rates, assign)
    if len(todo) <= 1024:
        sums_l = sums.tolist()
        stages = range(rates.shape[1])
        price = [math.exp(-k * x) for x in sums_l]
        picked = []
        for row in rates[todo].tolist():
            s = max(stages, key=lambda s: row[s] * price[s])
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
    for _ in range(max_steps):
        on = assign >= 0
        here = np.where(on, rates[idx, np.maximum(assign, 0)], 0.0)
        sums = np.bincount(assign[on], weights=here[on], minlength=n_stages)
        counts = np.bincount(assign[on & (here > 0)], minlength=n_stages)
        b = int(np.argmin(sums))
        low = sums[b]
        floor = low + _EPS * max(low, 1e-30)
        # moves: take w from its stage t (or from idle) to b
        src_after = np.where(on, sums[np.maximum(assign, 0)] - here, np.inf)
        movable = (assign != b) & (rates[:, b] > 0) & ((here <= 0) | (counts[np.maximum(assign, 0)] > req))
        gain = np.where(movable & (src_after > floor), np.minimum(low + rates[:, b], src_after), -np.inf)
        top = np.flatnonzero(gain > floor)
        if len(top) == 0:
            if not _swap(rates, assign, sums, counts, here, b, floor, req):
                return
            continue
        if len(top) > 64:
            top = top[np.argpartition(-gain[top], 63)[:64]]
        top = top[np.argsort(-gain[top], kind="stable")]
        sums_l, counts_l = sums.tolist(), counts.tolist()
        for w in top.tolist():
            t = int(assign[w])
            if t >= 0:
                if sums_l[t] - here[w] <= sums_l[b] * (1 + _EPS):
                    continue  # t has given enough this step: it would drop to the bottom
                if here[w] > 0 and counts_l[t] <= req:
                    continue
                sums_l[t] -= here[w]
                counts_l[t] -= here[w] > 0
            assign[w] = b
            sums_l[b] += rates[w, b]
            counts_l[b] += 1
            if sums_l[b] >= min(x for s, x in enumerate(sums_l) if s != b):
                break  # b is no longer the slowest: re-rank from the new bottleneck


def _swap(rates: np.ndarray, assign: np.ndarray, sums: np.ndarray, counts: np.ndarray, here: np.ndarray,
          b: int, floor: float, req: int) -> bool:
    """Exchange a worker of the slowest stage b with one elsewhere, if both stages end above floor."""
    mine = np.flatnonzero(assign == b)
    others = np.flatnonzero((assign >= 0) & (assign != b) & (rates[:, b] > 0))
    if len(mine) == 0 or len(others) == 0:
        return False
    if len(mine) * len(others) > 400_000:  # large fleets: the weakest members of b are the candidates
        mine = mine[np.argsort(rates[mine, b], kind="stable")[: max(1, 400_000 // len(others))]]
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


def _refine(costs: _Costs, fleet: _Fleet, cand: _Candidate, req: int, *, explore: bool = True) -> _Candidate:
    """Improve a candidate by turns: best boundaries for its teams, better teams for its
    boundaries, and (when `explore`) each boundary shifted by one layer with the teams
    re-searched, both from where they are and from scratch.

    The last catches what the first cannot: a boundary that should move but would push a
    worker out of memory, unless that worker trades places with another at the same time.
    """
    best = _reassign(costs, fleet, cand.assign, cand.boundaries, req)  # finish a cut-short search
    if best.key() < cand.key():
        best = cand
    kicks = _KICK_ROUNDS if len(fleet) <= _KICK_FLEET else 0
    for _ in range(_REFINE_ROUNDS):
        improved = False
        split = _best_boundaries(costs, fleet, best.assign, len(best.boundaries) - 1, req)
        if split is not None and split != best.boundaries:
            moved = _reassign(costs, fleet, best.assign, split, req)
            if moved.key() > best.key():
                best, improved = moved, True
        if kicks:
            kicked = _kick_search(_rate_matrix(costs, fleet, best.boundaries), best, req, kicks)
            if kicked.key() > best.key():
                best, improved = kicked, True
        if explore:
            start = best
            for split in _shifted(start.boundaries):
                for trial in (_reassign(costs, fleet, start.assign, split, req),
                              _assign_fresh(costs, fleet, split, req)):
                    served = _served(_rate_matrix(costs, fleet, split), trial.assign, req)
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


def _reassign(costs: _Costs, fleet: _Fleet, assign: np.ndarray, split: tuple[int, ...],
              req: int) -> _Candidate:
    """Keep the teams on a new split: workers that no longer fit are freed, then local search."""
    rates = _rate_matrix(costs, fleet, split)
    assign = assign.copy()
    on = assign >= 0
    assign[on & (rates[np.arange(len(assign)), np.maximum(assign, 0)] <= 0)] = -1
    _local_search(rates, assign, req)
    return _candidate(rates, assign, split)


def _kick_search(rates: np.ndarray, cand: _Candidate, req: int, rounds: int) -> _Candidate:
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
        trial = _candidate(rates, assign, cand.boundaries)
        if trial.key() > best.key() and _served(rates, assign, req):
            best = trial
    return best


def _served(rates: np.ndarray, assign: np.ndarray, req: int) -> bool:
    on = assign >= 0
    fit = on & (rates[np.arange(len(assign)), np.maximum(assign, 0)] > 0)
    return bool(np.bincount(assign[fit], minlength=rates.shape[1]).min() >= req)


def _best_boundaries(costs: _Costs, fleet: _Fleet, assign: np.ndarray, num_stages: int,
                     req: int) -> tuple[int, ...] | None:
    """The split that maximizes the slowest stage for fixed teams (each stage's workers).

    A stage's rate only falls as it grows, so for a target rate the stages can be laid out
    left to right, each taking as many layers as it can while staying at or above the
    target; the best target is found by bisection over the rates that can occur.
    """
    n = costs.n
    if num_stages == 1:
        return (0, n)
    crossings = _crossings(num_stages)
    rows = costs.unique_rows
    tables = []
    for s in range(num_stages):
        team = np.flatnonzero(assign == s)
        if len(team) == 0:
            return None
        r = fleet.rates(rows[:, 0], rows[:, 1], rows[:, 2], np.full(len(rows), crossings[s]), rows=team)
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


def _to_plan(costs: _Costs, fleet: _Fleet, cand: _Candidate, req: int, min_replicas: int) -> Plan:
    split = cand.boundaries
    rates = _rate_matrix(costs, fleet, split)
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


# ----------------------------------------------------------------------------- hysteresis


def _lifted(sums: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """The slowest stage's rate after adding `gain[s]` to stage s, for each s (-inf where gain is 0)."""
    order = np.argsort(sums, kind="stable")
    others = np.full(len(sums), sums[order[0]])
    others[order[0]] = sums[order[1]] if len(sums) > 1 else np.inf
    out = np.minimum(others, sums + gain)
    out[gain <= 0] = -np.inf
    return out


def _patch(costs: _Costs, fleet: _Fleet, current: Plan) -> Plan:
    """The current plan with the fewest changes that make it run on the live fleet."""
    split = current.boundaries
    n_stages = len(split) - 1
    rates = _rate_matrix(costs, fleet, split)
    idx = np.arange(len(fleet))
    assign = np.full(len(fleet), -1)
    for i, w in enumerate(fleet.workers):
        s = current.stage_of.get(w.worker_id, -1)
        # a worker that restarted (stage -1) or no longer fits its stage is placed afresh
        if w.stage_index != -1 and 0 <= s < n_stages and rates[i, s] > 0:
            assign[i] = s
    placed = 0
    # newcomers, fastest first, each where it lifts the slowest stage most (ties: where it runs fastest)
    sums = _stage_sums(rates, assign)
    best = rates.max(axis=1)
    newcomers = np.flatnonzero((assign < 0) & (best > 0))
    for i in newcomers[np.argsort(-best[newcomers], kind="stable")]:
        lifted = _lifted(sums, rates[i])
        top = np.flatnonzero(lifted >= lifted.max() - _EPS * max(abs(lifted.max()), 1e-30))
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
        sums = _stage_sums(rates, assign)
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
    sums = _stage_sums(rates, assign)
    live = set(fleet.ids)
    stage_of = {fleet.ids[i]: int(a) for i, a in enumerate(assign) if a >= 0}
    gone = sum(1 for w in current.stage_of if w not in live)
    note = f"{placed} placed, {moved} moved, {gone} gone; {sums.min():,.0f} tokens/s"
    return Plan(split, stage_of, tuple(float(x) for x in sums), note=note)
