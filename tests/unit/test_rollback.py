"""A lost stage takes the whole swarm back: the pure rules, and the Swarm applying them over a real
SQLite registry with a clock the test controls."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from coordinator.api.service import swarm_view
from coordinator.swarm.orchestrator import Swarm
from coordinator.swarm.rollback import (
    RESPLIT,
    STAGE_LOST,
    Generation,
    held_after,
    lost_stages,
    next_generation,
    verdict,
)
from protos import swarmtrain_pb2 as pb
from tests.harness.swarm_state import Clock, make_swarm, profile


def test_a_stage_is_lost_when_none_of_its_members_held_its_span() -> None:
    held = {"a": (0, 2), "b": (2, 4)}
    assert lost_stages((0, 2, 4), {"a": 0, "c": 1}, held) == [1]  # b is gone, c is new
    assert lost_stages((0, 2, 4), {"a": 0, "b": 1, "c": 1}, held) == []
    assert lost_stages((0, 1, 4), {"a": 0, "b": 1}, held) == [0, 1]  # a re-split: both spans are new
    # a worker waiting without a stage drops what it held; one placed holds its new span; one
    # the plan does not list (gone) keeps its entry
    assert held_after((0, 1, 4), {"a": -1, "b": 1}, held) == {"b": (1, 4)}
    assert held_after(None, {"a": -1}, held) == {"b": (2, 4)}


def test_the_verdict_goes_back_to_the_newest_checkpoint_or_the_seed_and_only_when_tokens_were_lost() -> None:
    start = Generation()
    to_checkpoint = verdict([1], (0, 2, 4), resplit=False, trained_tokens=50_000, generation=start, checkpoint=(3, 40_000))
    assert to_checkpoint is not None
    assert (to_checkpoint.reason, to_checkpoint.checkpoint_id, to_checkpoint.to_tokens,
            to_checkpoint.undone_tokens) == (STAGE_LOST, 3, 40_000, 10_000)
    to_seed = verdict([0, 1], (0, 1, 4), resplit=True, trained_tokens=50_000, generation=start, checkpoint=None)
    assert to_seed is not None and (to_seed.reason, to_seed.checkpoint_id, to_seed.to_tokens) == (RESPLIT, 0, 0)
    assert to_seed.lost_spans == ((0, 1), (1, 4)) and "the seed" in to_seed.line(1)
    assert verdict([], (0, 2, 4), resplit=False, trained_tokens=50_000, generation=start, checkpoint=None) is None
    after = next_generation(start, to_checkpoint, version=7)
    assert (after.number, after.start_tokens, dict(after.rollbacks), after.rolled_back_tokens,
            after.since_version) == (1, 40_000, {STAGE_LOST: 1}, 10_000, 7)
    # nothing trained since the swarm went back: starting a stage again loses nothing
    assert verdict([1], (0, 2, 4), resplit=False, trained_tokens=40_000, generation=after, checkpoint=(3, 40_000)) is None
    assert Generation.from_body({"generation": after.body()}) == after
    assert Generation.from_body({}) == Generation()  # a plan saved before generations existed


def join(swarm: Swarm, memory: int | None = None) -> tuple[str, str]:
    request = pb.JoinRequest(profile=profile() if memory is None else profile(memory=memory))
    record, token = swarm.join(request, "ipv4:127.0.0.1:1")
    return record.worker_id, token


def beat(swarm: Swarm, worker_id: str, token: str, tokens: int = 0, version: int | None = None) -> pb.HeartbeatResponse:
    """A heartbeat from a worker running its current assignment (or that of plan `version`)."""
    record = swarm.registry.workers[worker_id]
    return swarm.heartbeat(pb.HeartbeatRequest(
        worker_id=worker_id, session_token=token,
        plan_version=record.assigned_version if version is None else version,
        counters=pb.Counters(tokens=tokens, loss_sum=2.0 if tokens else 0.0, loss_count=1 if tokens else 0)))


def two_stages(tmp_path: Path, clock: Clock) -> tuple[Swarm, dict[int, tuple[str, str]]]:
    """Two workers that cannot hold the model alone: stage 0 and stage 1, one replica each, trained."""
    swarm = make_swarm(tmp_path, clock)
    ids = [join(swarm), join(swarm)]
    assert swarm.plan is not None and swarm.plan.num_stages == 2
    by_stage = {swarm.registry.workers[w].stage_index: (w, t) for w, t in ids}
    beat(swarm, *by_stage[1], tokens=20_480)  # the last stage counts the trained tokens
    assert swarm.registry.progress.trained_tokens == 20_480
    return swarm, by_stage


def lose(swarm: Swarm, clock: Clock, worker_id: str, keep: list[str]) -> None:
    clock.now += swarm.config.coordinator.heartbeat_timeout_s + 1
    for other in keep:
        swarm.registry.record_heartbeat(replace(swarm.registry.workers[other], last_heartbeat_unix=clock.now))
    assert swarm.sweep() == [worker_id]


def test_losing_the_only_replica_of_a_stage_restarts_the_whole_swarm_from_the_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = Clock()
    swarm, by_stage = two_stages(tmp_path, clock)
    (first, first_token), (last, _) = by_stage[0], by_stage[1]
    lose(swarm, clock, last, keep=[first])
    assert swarm.ledger.generation.number == 0  # nobody holds stage 1 yet: no plan, nothing decided
    runs = swarm.registry.workers[first].assigned_version
    newcomer, _ = join(swarm)
    generation = swarm.ledger.generation
    assert generation.number == 1 and dict(generation.rollbacks) == {STAGE_LOST: 1}
    assert generation.rolled_back_tokens == 20_480
    assert swarm.registry.progress.trained_tokens == 0  # the progress figure went back with the model
    out = capsys.readouterr().out
    assert "rollback to generation 1" in out and "the seed" in out and "undoing 20,480 trained tokens" in out
    # the stage-0 worker, which kept its stage, is told to rebuild it under the new generation
    reply = beat(swarm, first, first_token, version=runs)
    assert reply.instruction == pb.INSTRUCTION_REASSIGN and reply.assignment.generation == 1
    assert swarm.assignment_for(swarm.registry.workers[newcomer]).generation == 1
    view = swarm_view(swarm)
    assert view.generation == 1 and view.progress.rollbacks == 1 and view.progress.rolled_back_tokens == 20_480
    # it survives a coordinator restart
    swarm.registry.close()
    again = make_swarm(tmp_path, clock)
    assert again.ledger.generation == generation and again.registry.progress.trained_tokens == 0


def test_tokens_from_an_assignment_of_the_rolled_back_generation_do_not_count(tmp_path: Path) -> None:
    clock = Clock()
    swarm, by_stage = two_stages(tmp_path, clock)
    (first, first_token), (last, _) = by_stage[0], by_stage[1]
    lose(swarm, clock, last, keep=[first])
    newcomer, newcomer_token = join(swarm)
    assert swarm.ledger.generation.number == 1
    # whichever of the two the new plan puts on the last stage reports the trained tokens
    worker_id, token = (first, first_token) if swarm.registry.workers[first].stage_index == 1 \
        else (newcomer, newcomer_token)
    stale = swarm.ledger.generation.since_version - 1
    swarm.heartbeat(pb.HeartbeatRequest(worker_id=worker_id, session_token=token, plan_version=stale,
                                        counters=pb.Counters(tokens=4096, loss_sum=9.0, loss_count=1)))
    assert swarm.registry.progress.trained_tokens == 0
    beat(swarm, worker_id, token, tokens=4096)
    assert swarm.registry.progress.trained_tokens == 4096


def test_a_stage_with_a_replica_left_goes_on_without_a_rollback(tmp_path: Path) -> None:
    clock = Clock()
    swarm = make_swarm(tmp_path, clock)
    ids = [join(swarm) for _ in range(4)]
    assert swarm.plan is not None and swarm.plan.num_stages == 2  # two replicas of each stage
    last = next((w, t) for w, t in ids if swarm.registry.workers[w].stage_index == 1)
    beat(swarm, *last, tokens=8192)
    lose(swarm, clock, last[0], keep=[w for w, _ in ids if w != last[0]])
    assert swarm.ledger.generation.number == 0 and swarm.registry.progress.trained_tokens == 8192
    assert {r.stage_index for r in swarm.registry.active()} == {0, 1}
