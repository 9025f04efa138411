"""When the swarm checkpoints and which replica writes which stage (pure: no I/O, no clock).

Every `checkpoint_interval_s` a checkpoint opens for the current plan, with one writer per
stage: the replica furthest along. While it is open, a changed plan or the timeout abandons it,
and a stage whose writer went away before uploading gets another. The orchestrator acts on the
verdict; coordinator/storage/checkpoints.py keeps the files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from coordinator.storage.checkpoints import Checkpoint


@dataclass(frozen=True)
class Open:
    writers: dict[int, str]  # stage -> the worker asked to upload it


@dataclass(frozen=True)
class Abandon:
    why: str
    retry_now: bool  # the plan changed: the next checkpoint need not wait another interval


@dataclass(frozen=True)
class Rewrite:
    writers: dict[int, str]  # the open checkpoint's writers, with those gone replaced


def pick_writer(candidates: Sequence[tuple[str, int]]) -> str:
    """Of a stage's replicas (worker id, local step), the one furthest along; ties to the lowest id."""
    return min(candidates, key=lambda c: (-c[1], c[0]))[0]


def choose_writers(members: Mapping[int, Sequence[tuple[str, int]]],
                   num_stages: int) -> dict[int, str] | None:
    """Each stage's writer; None while some stage has no active worker (the checkpoint would be
    incomplete)."""
    if any(not members.get(stage) for stage in range(num_stages)):
        return None
    return {stage: pick_writer(members[stage]) for stage in range(num_stages)}


def next_step(checkpoint: Checkpoint | None, boundaries: Sequence[int] | None,
              members: Mapping[int, Sequence[tuple[str, int]]], *, now: float, tried_at: float,
              interval_s: float, timeout_s: float) -> Open | Abandon | Rewrite | None:
    """What to do about checkpoints now. `checkpoint`: the open one; `boundaries`: the plan's (None
    without a plan); `members`: each stage's active replicas as (worker id, local step);
    `tried_at`: when a checkpoint was last opened (or the count started)."""
    if checkpoint is not None:
        if boundaries is None or tuple(boundaries) != checkpoint.boundaries:
            return Abandon("the plan changed while it was written", retry_now=True)
        if now - checkpoint.opened_unix > timeout_s:
            missing = sorted(set(range(checkpoint.num_stages)) - set(checkpoint.parts))
            return Abandon(f"stage(s) {', '.join(map(str, missing))} not uploaded within {timeout_s:.0f}s",
                           retry_now=False)
        writers = dict(checkpoint.writers)
        for stage, writer in checkpoint.writers.items():
            replicas = members.get(stage, [])
            if stage not in checkpoint.parts and replicas and all(m[0] != writer for m in replicas):
                writers[stage] = pick_writer(replicas)
        return Rewrite(writers) if writers != checkpoint.writers else None
    if interval_s <= 0 or boundaries is None or now - tried_at < interval_s:
        return None
    writers = choose_writers(members, len(boundaries) - 1)
    return Open(writers) if writers is not None else None  # None: a stage's state would be missing
