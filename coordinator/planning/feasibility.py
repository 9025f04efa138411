"""Whether the live workers' memory can hold the model at all, and the errors that say why not.

The messages give the numbers (what training needs, what the fleet has, what to add), since
an operator reads them to decide which workers to start.
"""

from __future__ import annotations

import numpy as np

from coordinator.planning.plan import InfeasiblePlanError
from coordinator.planning.rate_model import Costs, Fleet

__all__ = ["ensure_holdable", "fragmented", "hall_ok"]


def _gb(x: float) -> str:
    """Bytes in the unit that keeps the number readable (a tiny test model needs MB, GPT-J GB)."""
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if x >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x:.0f} B"


def _model(costs: Costs) -> str:
    return f"the model ({costs.params / 1e9:.2f}B parameters)" if costs.params >= 1e8 else (
        f"the model ({costs.params / 1e6:.2f}M parameters)")


def ensure_holdable(costs: Costs, fleet: Fleet) -> None:
    """Raise with numbers when no split can place the model on these workers at all."""
    need = costs.total_memory
    what = _model(costs)
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


def hall_ok(stage_mem: np.ndarray, mems_desc: np.ndarray, req: int) -> bool:
    """Can every stage get `req` distinct workers that fit it? (Nested fits: sort and compare.)"""
    need = np.sort(stage_mem)[::-1]
    if len(need) * req > len(mems_desc):
        return False
    return bool(np.all(mems_desc[np.arange(1, len(need) + 1) * req - 1] >= need))


def fragmented(costs: Costs, fleet: Fleet) -> InfeasiblePlanError:
    """Enough memory in total, but no split gives every stage a worker it fits in."""
    mems = np.sort(fleet.mem)[::-1]
    shown = ", ".join(_gb(m) for m in mems[:8]) + (f" and {len(mems) - 8} more" if len(mems) > 8 else "")
    n = costs.n
    middle = costs.mem[1, 2:n] if n >= 3 else np.array([costs.total_memory])
    largest = int(np.count_nonzero(middle <= mems[0]))
    return InfeasiblePlanError(
        f"the fleet cannot hold {_model(costs)}: training needs "
        f"{_gb(costs.total_memory)} across stages and the {len(mems)} live workers have "
        f"{_gb(mems.sum())} in total ({shown}), but no split into at most {min(n, len(mems))} stages "
        f"gives every stage its own worker that fits it (the largest worker holds {largest} middle "
        f"layer{'s' if largest != 1 else ''}): add workers with more memory or use a model with fewer or smaller layers"
    )
