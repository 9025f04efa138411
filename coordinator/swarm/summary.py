"""The coordinator's periodic one-line swarm summary for the operator's terminal (pure)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

SUMMARY_INTERVAL_S = 15.0


@dataclass(frozen=True)
class SwarmSnapshot:
    active_by_stage: dict[int, int]  # stage -> active workers (-1: waiting for a stage)
    tokens_per_second: float  # measured
    trained_tokens: int
    total_tokens: int
    loss: float  # NaN before the last stage reported one
    usd_per_hour: float
    usd_spent: float
    complete: bool = False  # the budget is trained and its final checkpoint written


def summary_line(s: SwarmSnapshot) -> str:
    """e.g. 'swarm · 4 workers (stage 0: 2, stage 1: 2) · 12,345 tok/s · loss 2.310 · 45.1% of 1,000,000
    tokens · eta 0:01:02 · $1.20/h, $0.40 spent'."""
    workers = sum(s.active_by_stage.values())
    stages = ", ".join(f"stage {k}: {n}" if k >= 0 else f"waiting: {n}"
                       for k, n in sorted(s.active_by_stage.items()))
    parts = [f"swarm · {workers} worker{'s' if workers != 1 else ''}" + (f" ({stages})" if stages else "")]
    parts.append(f"{s.tokens_per_second:,.0f} tok/s")
    if math.isfinite(s.loss):
        parts.append(f"loss {s.loss:.3f}")
    share = s.trained_tokens / s.total_tokens if s.total_tokens else 0.0
    parts.append(f"{share:.1%} of {s.total_tokens:,} tokens")
    left = max(0, s.total_tokens - s.trained_tokens)
    if s.complete:
        parts.append("done")
    elif s.tokens_per_second > 0 and left:
        parts.append(f"eta {_clock(left / s.tokens_per_second)}")
    if s.usd_per_hour > 0 or s.usd_spent > 0:
        parts.append(f"${s.usd_per_hour:,.2f}/h, ${s.usd_spent:,.2f} spent")
    return " · ".join(parts)


def count_by_stage(stages: list[int]) -> dict[int, int]:
    return dict(Counter(stages))


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours}:{minutes:02d}:{secs:02d}"
