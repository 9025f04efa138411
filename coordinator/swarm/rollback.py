"""When a re-plan must take the whole swarm back to a checkpoint (pure: no I/O, no clock).

Between checkpoints a stage's trained state lives only in its replicas' memory. A stage of a new
plan whose layer span none of its members already holds (its last replica died or left, or a
re-split moved its layers) can only start from the newest complete checkpoint or the seed, while
the other stages would go on from newer parameters: the model would be stitched together from
different points of the run, and the progress figure would count tokens no stage remembers.
So the swarm goes back as a whole: every stage resumes from the newest complete checkpoint (or,
with none, the seed) under a new *generation*, and the trained tokens move back to that
checkpoint's. Workers drop a stage built under another generation, and stages of different
generations never talk to each other (worker/runtime/policy.stage_key).

Nothing goes back when nothing was lost: no stage's state, or no token trained since the current
generation began (a swarm that just went back loses nothing by starting a stage again).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

Span = tuple[int, int]

STAGE_LOST, RESPLIT = "stage_lost", "resplit"  # why a rollback happened: a metric label
REASONS = (STAGE_LOST, RESPLIT)


@dataclass(frozen=True)
class Generation:
    """Where the swarm's model state comes from, as the registry keeps it with the plan."""
    number: int = 0
    start_tokens: int = 0  # trained tokens when it began: a checkpoint's, or 0 for the seed
    rollbacks: Mapping[str, int] = field(default_factory=dict)  # reason -> count, all generations
    rolled_back_tokens: int = 0  # trained tokens the rollbacks undid, in all
    since_version: int = 0  # the plan version it began with: older assignments train an older one

    @classmethod
    def from_body(cls, body: Mapping) -> Generation:
        g = body.get("generation") or {}
        return cls(int(g.get("number", 0)), int(g.get("start_tokens", 0)),
                   {str(k): int(v) for k, v in (g.get("rollbacks") or {}).items()},
                   int(g.get("rolled_back_tokens", 0)), int(g.get("since_version", 0)))

    def body(self) -> dict:
        return {"number": self.number, "start_tokens": self.start_tokens, "rollbacks": dict(self.rollbacks),
                "rolled_back_tokens": self.rolled_back_tokens, "since_version": self.since_version}


@dataclass(frozen=True)
class Rollback:
    reason: str  # STAGE_LOST or RESPLIT
    lost: tuple[int, ...]  # stages of the new plan whose state no member holds
    lost_spans: tuple[Span, ...]  # their layers
    checkpoint_id: int  # what every stage resumes from; 0: the seed
    to_tokens: int  # the trained tokens the swarm goes back to
    undone_tokens: int  # trained tokens given up

    def line(self, generation: int) -> str:
        """The operator's log line, e.g. 'rollback to generation 2: no live replica holds the trained
        state of stage 1 (layers [2, 4)); every stage goes back to checkpoint 7 at ...'."""
        stages = ", ".join(f"{i} (layers [{a}, {b}))" for i, (a, b) in zip(self.lost, self.lost_spans, strict=True))
        why = ("no live replica holds the trained state of stage " if self.reason == STAGE_LOST
               else "a re-split leaves no live replica holding the trained state of stage ")
        where = (f"checkpoint {self.checkpoint_id} at {self.to_tokens:,} trained tokens" if self.checkpoint_id
                 else "the seed (no complete checkpoint yet)")
        return (f"rollback to generation {generation}: {why}{stages}; every stage goes back to {where}, "
                f"undoing {self.undone_tokens:,} trained tokens")


def spans(boundaries: Sequence[int]) -> list[Span]:
    return [(boundaries[i], boundaries[i + 1]) for i in range(len(boundaries) - 1)]


def held_after(boundaries: Sequence[int] | None, stage_of: Mapping[str, int],
               held: Mapping[str, Span]) -> dict[str, Span]:
    """Which span each worker holds once it runs the plan (`boundaries`, `stage_of`): a worker
    placed on a stage builds (or keeps) that stage; one left without a stage drops it (a worker
    that waits for a stage lets go of its last one). Workers the plan does not list (gone ones)
    keep their entry: one that comes back with its process has its stage still."""
    after = dict(held)
    by_stage = spans(boundaries) if boundaries else []
    for worker_id, stage in stage_of.items():
        if stage >= 0 and by_stage:
            after[worker_id] = by_stage[stage]
        else:
            after.pop(worker_id, None)
    return after


def lost_stages(boundaries: Sequence[int], stage_of: Mapping[str, int], held: Mapping[str, Span]) -> list[int]:
    """Stages of the plan (`boundaries`, `stage_of`) none of whose members holds the stage's span."""
    by_stage = spans(boundaries)
    kept = {stage for worker_id, stage in stage_of.items()
            if stage >= 0 and held.get(worker_id) == by_stage[stage]}
    return [i for i in range(len(by_stage)) if i not in kept]


def verdict(lost: Sequence[int], boundaries: Sequence[int], *, resplit: bool, trained_tokens: int,
            generation: Generation, checkpoint: tuple[int, int] | None) -> Rollback | None:
    """Whether losing the state of stages `lost` of the plan split at `boundaries` takes the swarm
    back, and to what. `checkpoint`: the newest complete one's (id, trained tokens), or None."""
    if not lost or trained_tokens <= generation.start_tokens:
        return None
    checkpoint_id, to_tokens = checkpoint if checkpoint else (0, 0)
    to_tokens = min(to_tokens, trained_tokens)
    by_stage = spans(boundaries)
    return Rollback(RESPLIT if resplit else STAGE_LOST, tuple(lost), tuple(by_stage[i] for i in lost), checkpoint_id,
                    to_tokens, trained_tokens - to_tokens)


def next_generation(current: Generation, rollback: Rollback, version: int) -> Generation:
    """The generation `rollback` starts with the plan of `version`."""
    counts = dict(current.rollbacks)
    counts[rollback.reason] = counts.get(rollback.reason, 0) + 1
    return replace(current, number=current.number + 1, start_tokens=rollback.to_tokens, rollbacks=counts,
                   rolled_back_tokens=current.rolled_back_tokens + rollback.undone_tokens, since_version=version)
