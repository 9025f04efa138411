"""What the planner takes and gives: a worker's capacity, a plan, and the error when none exists.

The planning itself is in `coordinator.planning.planner`; these types sit apart so that every part of
it can use them without importing the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from configs.link import Link

__all__ = ["InfeasiblePlanError", "Plan", "WorkerCapacity", "with_note"]


@dataclass(frozen=True)
class WorkerCapacity:
    """What the planner needs to know about one live worker."""

    worker_id: str
    achieved_flops: float  # FLOP/s it sustained on its benchmark, not the datasheet peak
    memory_bytes: int  # what a stage may use of its accelerator, the framework's reserve taken off
    link: Link  # bytes/s each way; a boundary's traffic is bound by the slower one
    # compressed / raw bytes of the heaviest activation codec the policy allows this worker
    activation_compression_ratio: float = 1.0
    stage_index: int = -1  # the stage it serves now, -1 if none
    device: str = "cuda"  # "cpu" for a worker that trains on its CPU: its averaging state shares the RAM
    # False when the coordinator could not connect to its data plane (behind a closed home router):
    # it can only drive the pipeline from stage 0, which dials out; later stages must be dialled
    reachable: bool = True

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"{self.worker_id}: device must be 'cpu' or 'cuda' (got {self.device!r})")
        if not 0 < self.activation_compression_ratio <= 1:
            raise ValueError(
                f"{self.worker_id}: activation_compression_ratio must be in (0, 1] "
                f"(got {self.activation_compression_ratio})"
            )
        for name in ("achieved_flops", "memory_bytes"):
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


def with_note(p: Plan, note: str) -> Plan:
    return Plan(p.boundaries, p.stage_of, p.stage_rates, note)
