"""The plan the swarm runs and its version: the one place they change, in the registry first.

A re-plan's verdict (coordinator/swarm/replanning.py) is committed here: the plan, its note and
every reassigned worker in one transaction, and one line in the operator's log. The version goes
up only when something changed, so a worker whose assignment is current keeps beating at it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from coordinator.planning.plan import Plan
from coordinator.storage.registry import Registry, WorkerRecord
from coordinator.swarm.replanning import PlanDiff, PlanVerdict


def plan_body(plan: Plan | None, note: str) -> dict:
    """What the registry keeps of a plan."""
    return {
        "boundaries": list(plan.boundaries) if plan else [],
        "stage_of": dict(plan.stage_of) if plan else {},
        "note": note,
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

    def restore(self, version: int, plan: Plan | None, note: str) -> None:
        """What the registry held when the coordinator started."""
        self.version, self.plan, self.note = version, plan, note

    def commit(self, verdict: PlanVerdict, diff: PlanDiff, active: Sequence[WorkerRecord]) -> bool:
        """Adopt `verdict`; when `diff` changed anything, record it under the next version with the
        reassigned workers' new stages. True if it did."""
        self.plan, self.note = verdict.plan, verdict.note
        if not diff.changed:
            return False  # nothing to record: same split, same members
        self.version += 1
        moved = [replace(r, stage_index=diff.stage_of[r.worker_id], assigned_version=self.version)
                 for r in active if r.worker_id in diff.reassigned]
        self.registry.save_plan(self.version, plan_body(verdict.plan, verdict.note), moved)
        print(plan_line(self.version, verdict, diff), flush=True)
        return True

    def reissue(self, records: Sequence[WorkerRecord]) -> None:
        """Give `records` their assignment again under the next version (same plan, other settings)."""
        self.version += 1
        self.registry.save_plan(self.version, plan_body(self.plan, self.note),
                                [replace(r, assigned_version=self.version) for r in records])
        print(f"plan {self.version}: re-issued {len(records)} worker(s)' assignment with the compression "
              "their measured rate calls for", flush=True)
