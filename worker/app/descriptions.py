"""What an assignment says, as one line for the volunteer and as the fields of its trace event (pure)."""

from __future__ import annotations

from typing import Any

from protos import swarmtrain_pb2 as pb
from worker.runtime.settings import describe_codec


def describe_layers(start: int, end: int, n_layer: int) -> str:
    """Half-open [start, end) as people count blocks: 'layers 2–3 of 4', 'layer 2 of 4'."""
    if end - start == 1:
        return f"layer {start} of {n_layer}"
    return f"layers {start}–{end - 1} of {n_layer}"


def describe_assignment(assignment: pb.Assignment, worker_id: str, n_layer: int) -> str:
    """`assigned: stage 1 of 2 · layers 2–3 of 4 · activations ... · worker w-...`"""
    a = assignment
    parts = [
        f"stage {a.stage_index} of {a.num_stages}",
        describe_layers(a.layer_start, a.layer_end, n_layer),
    ]
    if a.num_stages > 1:  # a lone stage sends no activations
        parts.append(f"activations {describe_codec(a.activation_compression)}"
                     + (", steps overlapped" if a.overlap_steps and a.stage_index == 0 else ""))
    period = "every step" if a.sync_period_steps <= 1 else f"every {a.sync_period_steps} steps"
    parts.append(f"sync {describe_codec(a.sync_compression)} {period}")
    if a.data_shard_count:
        parts.append(f"data shard {a.data_shard_index}/{a.data_shard_count}")
    parts.append(f"worker {worker_id}")
    return "assigned: " + " · ".join(parts)


def assigned_event(assignment: pb.Assignment, worker_id: str) -> dict[str, Any]:
    """The `assigned` trace event's fields: what the `assigned:` line says, for programs."""
    a = assignment
    return {"worker_id": worker_id, "stage": a.stage_index, "num_stages": a.num_stages,
            "layers": [a.layer_start, a.layer_end], "plan_version": a.plan_version}
