"""The planner's rate model in arrays: what each stage costs and what each worker does on it.

`Costs` prices every possible stage [start, end) of the model once, `Fleet` holds the live
workers' numbers, and `rate_matrix` combines them into the tokens/s of every worker on every
stage of a split (the model itself is described in `coordinator.planning.planner`). Everything else in
the planner reads rates from here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from configs.memory import Device, stage_peak
from configs.profile import ModelProfile, train_flops_per_token
from coordinator.planning.plan import Plan, WorkerCapacity

__all__ = [
    "EPS",
    "Costs",
    "Fleet",
    "assignment_array",
    "check_boundaries",
    "fits_model",
    "link_rates",
    "planning_device",
    "rate_matrix",
    "stage_crossings",
    "stage_sums",
]


# Relative slack under which two rates count as equal (they are float sums).
EPS = 1e-9


# ----------------------------------------------------------------------------- model costs


class Costs:
    """Training cost of every possible stage [start, end), as (n+1) x (n+1) arrays.

    Built once per call from prefix sums, so a candidate split is priced by indexing
    instead of summing `LayerCost`s again. Memory is the peak of a stage on a `device` worker
    (configs.memory.stage_peak): it depends on where the stage runs, not only on its layers.
    """

    def __init__(self, profile: ModelProfile, device: Device = "cuda") -> None:
        n = profile.n_layer
        if n < 1:
            raise ValueError("the model profile has no blocks")
        self.n = n
        blocks = profile.blocks
        pf = np.concatenate([[0.0], np.cumsum([b.train_flops_per_token for b in blocks], dtype=float)])
        start = np.arange(n + 1)[:, None]
        end = np.arange(n + 1)[None, :]
        at_start = (start == 0).astype(float)
        at_end = (end == n).astype(float)
        self.flops = pf[None, :] - pf[:, None] + at_start * profile.embedding.train_flops_per_token
        self.flops += at_end * profile.head.train_flops_per_token
        self.mem = _memory_table(profile, device)
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

    @classmethod
    def for_workers(cls, profile: ModelProfile, workers: Sequence[WorkerCapacity]) -> Costs:
        """The costs `workers` are planned with: memory figures of their `planning_device`."""
        return cls(profile, planning_device(workers))

    def stages(self, boundaries: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        b = np.asarray(boundaries)
        return self.flops[b[:-1], b[1:]], self.mem[b[:-1], b[1:]], self.act[b[:-1], b[1:]]

    def params_of(self, start: int, end: int) -> float:
        """Parameters of the stage [start, end): its FLOPs per token over the FLOPs per parameter."""
        return float(self.flops[start, end]) / train_flops_per_token(1)

    def smallest_stage_memory(self) -> float:
        """Memory of the cheapest stage any plan must still place (one block, or an end)."""
        n = self.n
        if n == 1:
            return self.total_memory
        return float(max(self.mem[0, 1], self.mem[n - 1, n]))


def _memory_table(profile: ModelProfile, device: Device) -> np.ndarray:
    """stage_peak of every stage [start, end); 0 where end <= start. Identical blocks make a
    stage's memory a function of its length and of whether it holds the embedding or the head,
    so ~4n distinct figures, each computed once."""
    n = profile.n_layer
    mem = np.zeros((n + 1, n + 1))
    uniform = all(b == profile.blocks[0] for b in profile.blocks)
    seen: dict[tuple[int, ...], int] = {}
    for start in range(n):
        for end in range(start + 1, n + 1):
            key = (end - start, start == 0, end == n) if uniform else (start, end)
            if key not in seen:
                seen[key] = stage_peak(profile, start, end, device)
            mem[start, end] = seen[key]
    return mem


def planning_device(workers: Sequence[WorkerCapacity]) -> Device:
    """The device whose memory figures a fleet is planned with: "cuda" unless a worker trains on
    a CPU. A CPU worker keeps its averaging state in the same memory as its stage, so its figure
    is the larger: a GPU in a fleet with CPU workers is planned with it too (the safe side)."""
    return "cpu" if any(w.device == "cpu" for w in workers) else "cuda"


def stage_crossings(num_stages: int) -> np.ndarray:
    """Tensors per token a stage moves over its links: 1 at the ends, 2 in the middle."""
    if num_stages == 1:
        return np.zeros(1)
    k = np.full(num_stages, 2.0)
    k[0] = k[-1] = 1.0
    return k


# ----------------------------------------------------------------------------- the fleet


class Fleet:
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
        self.link = np.array([w.link.bottleneck_bytes_per_s for w in workers], dtype=float)
        self.ratio = np.array([w.activation_compression_ratio for w in workers], dtype=float)
        self.unreachable = np.array([not w.reachable for w in workers], dtype=bool)

    def sample(self, size: int) -> Fleet:
        """A fixed pseudo-random subset (the same fleet always gives the same sample)."""
        rows = np.sort(np.random.default_rng(len(self.ids)).choice(len(self.ids), size, replace=False))
        return Fleet([self.workers[i] for i in rows])

    def __len__(self) -> int:
        return len(self.ids)

    def rates(self, flops: np.ndarray, mem: np.ndarray, act: np.ndarray, crossings: np.ndarray,
              rows: np.ndarray | None = None, first: np.ndarray | None = None) -> np.ndarray:
        """Tokens/s of each worker (rows) on each stage (columns) given the stages' costs.
        `first`: which columns are a first stage (default: column 0, the stages in order)."""
        sel = slice(None) if rows is None else rows
        compute = self.flops[sel, None] / flops[None, :]
        traffic = act[None, :] * crossings[None, :] * self.ratio[sel, None]
        rate = np.minimum(compute, link_rates(self.link[sel, None], traffic))
        rate[self.mem[sel, None] < mem[None, :]] = 0.0
        unreachable = self.unreachable[sel]
        if unreachable.any():  # later stages are dialled: nobody can dial these
            later = ~first if first is not None else np.arange(rate.shape[1]) > 0
            rate[np.ix_(unreachable, later)] = 0.0
        return rate


def link_rates(link: np.ndarray, sent: np.ndarray) -> np.ndarray:
    """Tokens/s links of `link` bytes/s carry at `sent` bytes per token; unbounded where nothing is sent."""
    with np.errstate(divide="ignore"):
        return np.where(sent > 0, link / np.where(sent > 0, sent, 1.0), np.inf)


def rate_matrix(costs: Costs, fleet: Fleet, boundaries: Sequence[int]) -> np.ndarray:
    f, m, a = costs.stages(boundaries)
    return fleet.rates(f, m, a, stage_crossings(len(boundaries) - 1))


def stage_sums(rates: np.ndarray, assign: np.ndarray) -> np.ndarray:
    on = assign >= 0
    mine = rates[np.flatnonzero(on), assign[on]]
    return np.bincount(assign[on], weights=mine, minlength=rates.shape[1])


def check_boundaries(boundaries: Sequence[int], n: int) -> tuple[int, ...]:
    b = tuple(int(x) for x in boundaries)
    if len(b) < 2 or b[0] != 0 or b[-1] != n or any(x >= y for x, y in zip(b, b[1:])):
        raise ValueError(f"boundaries must rise strictly from 0 to n_layer={n} (got {list(b)})")
    return b


def assignment_array(fleet: Fleet, stage_of: Mapping[str, int], num_stages: int) -> np.ndarray:
    assign = np.full(len(fleet), -1)
    for i, wid in enumerate(fleet.ids):
        s = stage_of.get(wid, -1)
        if s >= num_stages or s < -1:
            raise ValueError(f"worker {wid} is on stage {s}, but the plan has {num_stages} stages")
        assign[i] = s
    return assign


def fits_model(p: Plan, n_layer: int) -> bool:
    try:
        check_boundaries(p.boundaries, n_layer)
    except ValueError:
        return False
    return True
