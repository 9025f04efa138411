"""The plan the swarm runs and its version: the one place they change, in the registry first.

A re-plan's verdict (coordinator/swarm/replanning.py) is committed here: the plan, its note and
every reassigned worker in one transaction, and one line in the operator's log. The version goes
up only when something changed, so a worker whose assignment is current keeps beating at it.

The ledger also keeps the swarm's generation (coordinator/swarm/rollback.py) and which layer span
each worker holds: a commit that rolls the swarm back moves every placed worker to the new
generation, and the trained tokens back, in the same transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from coordinator.planning.plan import Plan
from coordinator.storage.registry import Progress, Registry, WorkerRecord
from coordinator.swarm.replanning import PlanDiff, PlanVerdict
from coordinator.swarm.rollback import Generation, Rollback, Span, held_after, lost_stages, next_generation


def plan_body(plan: Plan | None, note: str, generation: Generation) -> dict:
    """What the registry keeps of a plan."""
    return {
        "boundaries": list(plan.boundaries) if plan else [],
        "stage_of": dict(plan.stage_of) if plan else {},
        "note": note,
        "generation": generation.body(),
    }


def plan_line(version: int, verdict: PlanVerdict, diff: PlanDiff) -> str:
    """e.g. 'plan 3: 2 stages at layers [0, 2, 4], 4 workers placed, 2 reassigned: first plan: ...'."""
    plan = verdict.plan
    if plan is None:
        waiting = sum(1 for stage in diff.stage_of.values() if stage < 0)
        return f"plan {version}: none, {waiting} worker(s) waiting: {verdict.note}"
    return (f"plan {version}: {plan.num_stages} stage(s) at layers {list(plan.boundaries)}, "
            f"{len(plan.stage_of)} worker(s) placed, {len(diff.reassigned)} reassigned: {verdict.note}")


class PlanLedger:
    """The current plan, its note and version, as the registry holds them."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.plan: Plan | None = None
        self.note = ""
        self.version = 0
        self.generation = Generation()
        self.held: dict[str, Span] = {}  # worker -> the layer span whose state it holds, this generation

    def restore(self, version: int, plan: Plan | None, note: str, generation: Generation,
                active: Sequence[WorkerRecord]) -> None:
        """What the registry held when the coordinator started."""
        self.version, self.plan, self.note, self.generation = version, plan, note, generation
        self.held = held_after(plan.boundaries if plan else None, {r.worker_id: r.stage_index for r in active}, {})

    def lost(self, plan: Plan) -> list[int]:
        """Stages of `plan` that none of their members holds the state of."""
        return lost_stages(plan.boundaries, plan.stage_of, self.held)

    def commit(self, verdict: PlanVerdict, diff: PlanDiff, active: Sequence[WorkerRecord],
               rollback: Rollback | None = None) -> bool:
        """Adopt `verdict`; when `diff` changed anything, record it under the next version with the
        reassigned workers' new stages. With `rollback`, every placed worker is reassigned under
        the next generation and the progress goes back. True if it recorded a version."""
        self.plan, self.note = verdict.plan, verdict.note
        if rollback is not None:  # every stage starts again: nobody holds what they trained
            self.generation, self.held = next_generation(self.generation, rollback, self.version + 1), {}
        self.held = held_after(verdict.plan.boundaries if verdict.plan else None, diff.stage_of, self.held)
        if not diff.changed and rollback is None:
            return False  # nothing to record: same split, same members
        self.version += 1
        moved = [replace(r, stage_index=diff.stage_of[r.worker_id], assigned_version=self.version)
                 for r in active if r.worker_id in diff.reassigned
                 or (rollback is not None and diff.stage_of[r.worker_id] >= 0)]
        progress = Progress(trained_tokens=rollback.to_tokens) if rollback else None
        self.registry.save_plan(self.version, plan_body(verdict.plan, verdict.note, self.generation), moved,
                                progress)
        print(plan_line(self.version, verdict, diff), flush=True)
        return True

    def reissue(self, records: Sequence[WorkerRecord]) -> None:
        """Give `records` their assignment again under the next version (same plan, other settings)."""
        self.version += 1
        self.registry.save_plan(self.version, plan_body(self.plan, self.note, self.generation),
                                [replace(r, assigned_version=self.version) for r in records])
        print(f"plan {self.version}: re-issued {len(records)} worker(s)' assignment with the compression "
              "their measured rate calls for", flush=True)
