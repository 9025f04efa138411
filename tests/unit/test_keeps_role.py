"""Which re-assignments a running role takes in place, and which restart it (keeps_role)."""

from __future__ import annotations

import pytest

from protos import swarmtrain_pb2 as pb
from worker.runtime.policy import keeps_role


def assignment(stage: int = 1, **changes: object) -> pb.Assignment:
    start, end = ((0, 2), (2, 4))[stage]
    fields: dict[str, object] = {
        "plan_version": 3, "stage_index": stage, "num_stages": 2, "layer_start": start, "layer_end": end,
        "activation_compression": pb.CompressionSpec(codec=pb.CODEC_BLOCKWISE_8BIT, block_size=64),
        "sync_compression": pb.CompressionSpec(codec=pb.CODEC_BLOCKWISE_8BIT, block_size=64),
        "sync_period_steps": 64, "averaging_group": f"run.stage{stage}.layers{start}-{end}",
        "config_hash": "abc", "lease_expires_unix": 1000.0, "stage_boundaries": [0, 2, 4],
        "data_shard_index": 0, "data_shard_count": 2,
    }
    fields.update(changes)
    return pb.Assignment(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("changes", [
    {"plan_version": 4},
    {"lease_expires_unix": 2000.0},
    {"sync_period_steps": 256},
    {"sync_compression": pb.CompressionSpec(codec=pb.CODEC_TOPK_4BIT, topk_fraction=0.01)},
    {"activation_compression": pb.CompressionSpec(codec=pb.CODEC_BLOCKWISE_4BIT, block_size=64)},
    {"overlap_steps": True},
    {"plan_version": 9, "sync_period_steps": 16, "overlap_steps": True},
])
def test_new_settings_or_a_new_plan_version_keep_the_role(changes: dict[str, object]) -> None:
    assert keeps_role(assignment(), assignment(**changes))
    assert keeps_role(assignment(0), assignment(0, **changes))


@pytest.mark.parametrize("changes", [
    {"stage_index": 0},
    {"num_stages": 3, "stage_boundaries": [0, 1, 2, 4]},
    {"layer_start": 1},
    {"layer_end": 3},
    {"stage_boundaries": [0, 1, 4]},
    {"averaging_group": "run.stage1.layers2-4.b"},
    {"config_hash": "def"},
])
def test_other_work_restarts_the_role(changes: dict[str, object]) -> None:
    assert not keeps_role(assignment(), assignment(**changes))


def test_a_new_data_shard_keeps_the_role_stage_0_moves_to_it_between_steps() -> None:
    for changes in ({"data_shard_index": 1}, {"data_shard_count": 3}):
        assert keeps_role(assignment(0), assignment(0, **changes))
        assert keeps_role(assignment(1), assignment(1, **changes))


def test_a_first_assignment_starts_a_role() -> None:
    assert not keeps_role(None, assignment())
