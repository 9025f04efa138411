"""The swarm's checkpoints: the store, and acting on the schedule's verdicts (checkpoint_schedule).

Besides the periodic checkpoints, a run that reached its token budget takes a final one at once:
the run is complete when the newest complete checkpoint holds at least the whole budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from configs.schema import RunConfig
from coordinator.planning.planner import Plan
from coordinator.storage.checkpoints import Checkpoint, CheckpointStore
from coordinator.storage.registry import Registry, WorkerRecord
from coordinator.swarm import roster
from coordinator.swarm.checkpoint_schedule import Abandon, Open, Rewrite, next_step


class Checkpointing:
    def __init__(self, config: RunConfig, registry: Registry, clock: Callable[[], float]) -> None:
        self.config, self.clock = config, clock
        self.store = CheckpointStore(config.state_path / "checkpoints", registry.connection,
                                     config.coordinator.checkpoints_kept, clock)
        latest = self.store.latest
        # the next checkpoint comes one interval after the newest one; a run without one yet
        # takes its first early, once training has started (`tick`)
        self._tried: float | None = latest.opened_unix if latest else None

    def final(self, total_tokens: int) -> Checkpoint | None:
        """The checkpoint that ends the run: the newest complete one, if it holds the whole budget."""
        latest = self.store.latest
        return latest if latest is not None and latest.trained_tokens >= total_tokens else None

    def completion(self, final: Checkpoint, trained_tokens: int) -> str:
        """What a worker is told, and the operator reads, once the run is complete."""
        return (f"run complete: {trained_tokens:,} tokens trained of a budget of "
                f"{self.config.training.total_tokens:,}; final checkpoint {final.checkpoint_id} in "
                f"{self.store.final_dir(final.checkpoint_id)}")

    def tick(self, plan: Plan | None, active: Sequence[WorkerRecord], trained_tokens: int, *,
             final_due: bool) -> None:
        """Open a checkpoint when due (at once when `final_due`), abandon or re-staff the open one."""
        c, store, now = self.config.coordinator, self.store, self.clock()
        if self._tried is None:  # no checkpoint yet: the count starts with the first trained tokens
            if not trained_tokens and not final_due:
                return
            self._tried = now - max(0.0, c.checkpoint_interval_s - c.first_checkpoint_s)
        # the final checkpoint is due now, even where periodic ones are off (interval 0)
        tried, interval = (-math.inf, 1.0) if final_due else (self._tried, c.checkpoint_interval_s)
        step = next_step(store.open, plan.boundaries if plan else None, roster.members_by_stage(active),
                         now=now, tried_at=tried, interval_s=interval, timeout_s=c.checkpoint_timeout_s)
        if isinstance(step, Abandon):
            store.abandon(step.why)
            if step.retry_now:
                self._tried = now - c.checkpoint_interval_s
        elif isinstance(step, Rewrite):
            store.set_writers(step.writers)
        elif isinstance(step, Open):
            assert plan is not None
            self._tried = now
            store.open_checkpoint(plan.boundaries, step.writers, trained_tokens)
