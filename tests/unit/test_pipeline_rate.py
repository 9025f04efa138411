"""The pipeline's schedule in the rate model (coordinator/planning/pipeline_rate.py): fill and
drain per step, few micro-batches in flight, averaging's share of a link, a newcomer's download."""

from __future__ import annotations

import pytest

from configs.link import Link
from configs.loader import load_config
from configs.profile import model_profile
from coordinator.planning.pipeline_rate import Schedule, pipeline_estimate, schedule_of, state_download_s
from coordinator.planning.plan import Plan, WorkerCapacity
from coordinator.planning.planner import evaluate
from coordinator.planning.rate_model import Costs, Fleet

CONFIG = load_config("tiny")
PROFILE = model_profile(CONFIG.model, "fp32")  # four equal blocks; the ends add the embedding and head
B = 1024  # tokens per micro-batch


def workers(count: int, mbps: float = 1e6) -> list[WorkerCapacity]:
    return [WorkerCapacity(f"w{i}", 1e10, 2**40, Link.from_mbps(mbps)) for i in range(count)]


def estimate(boundaries: tuple[int, ...], stage_of: dict[str, int], fleet: list[WorkerCapacity],
             schedule: Schedule):
    rates = evaluate(PROFILE, fleet, boundaries, stage_of)
    plan = Plan(boundaries, stage_of, tuple(rates))
    return plan, pipeline_estimate(Costs(PROFILE), Fleet(fleet), plan, schedule)


def micro_batch_s(fleet: list[WorkerCapacity], start: int, end: int) -> float:
    return B / (fleet[0].achieved_flops / PROFILE.stage_cost(start, end).train_flops_per_token)


def test_one_stage_trains_at_its_own_rate() -> None:
    fleet = workers(3)
    plan, est = estimate((0, 4), {w.worker_id: 0 for w in fleet}, fleet, Schedule(2, 2, B))
    assert est.rate == pytest.approx(plan.rate) and est.efficiency == pytest.approx(1.0)
    assert est.drivers == 3


def test_fill_and_drain_cost_a_step_what_gpipe_says() -> None:
    """Four stages of one worker each, 8 micro-batches, 4 in flight, fast links: each step pays
    the round trip once on top of the bottleneck's 7 more micro-batches."""
    fleet = workers(4)
    bounds = (0, 1, 2, 3, 4)
    plan, est = estimate(bounds, {f"w{i}": i for i in range(4)}, fleet, Schedule(8, 4, B))
    trip = sum(micro_batch_s(fleet, s, s + 1) for s in range(4))
    slowest = max(micro_batch_s(fleet, s, s + 1) for s in range(4))
    assert est.round_trip_s == pytest.approx(trip, rel=1e-3)  # the links add ~nothing at 1 Tbit/s
    assert est.step_s == pytest.approx(trip + 7 * slowest, rel=1e-3)
    assert est.rate == pytest.approx(8 * B / est.step_s)
    assert est.rate < plan.rate  # the planner's figure is what a full pipeline would do


def test_one_micro_batch_in_flight_leaves_all_stages_but_one_idle() -> None:
    fleet = workers(4)
    _, est = estimate((0, 1, 2, 3, 4), {f"w{i}": i for i in range(4)}, fleet, Schedule(8, 1, B))
    assert est.step_s == pytest.approx(8 * est.round_trip_s)
    assert est.rate == pytest.approx(B / est.round_trip_s)


def test_overlapping_steps_keep_the_pipeline_full() -> None:
    fleet = workers(4)
    plan, est = estimate((0, 2, 4), {"w0": 0, "w1": 0, "w2": 1, "w3": 1}, fleet, Schedule(8, 4, B, overlap_steps=True))
    assert est.rate == pytest.approx(plan.rate)


def test_averaging_takes_its_share_of_a_replicated_stages_link() -> None:
    """Link-bound stages of two replicas: a 10% share for averaging rounds is 10% less rate."""
    fleet = workers(4, mbps=1.0)
    stage_of = {"w0": 0, "w1": 0, "w2": 1, "w3": 1}
    _, free = estimate((0, 2, 4), stage_of, fleet, Schedule(2, 2, B, overlap_steps=True))
    _, shared = estimate((0, 2, 4), stage_of, fleet, Schedule(2, 2, B, overlap_steps=True, averaging_share=0.1))
    assert shared.slowest_stage_rate == pytest.approx(0.9 * free.slowest_stage_rate)


def test_a_newcomer_downloads_its_stages_parameters_at_the_holders_link() -> None:
    fleet = workers(2, mbps=100.0)
    plan, _ = estimate((0, 2, 4), {"w0": 0, "w1": 1}, fleet, Schedule(2, 2, B))
    params = PROFILE.stage_cost(2, 4).params
    assert state_download_s(Costs(PROFILE), Fleet(fleet), plan, 1) == pytest.approx(4 * params / 12.5e6)


def test_a_runs_schedule_comes_from_its_config() -> None:
    schedule = schedule_of(CONFIG.training, CONFIG.coordinator.compression)
    assert (schedule.microbatches_per_step, schedule.in_flight) == (2, 2)  # batch 16 of micro-batches of 8
    assert schedule.tokens_per_microbatch == 8 * 128
    assert schedule.averaging_share == CONFIG.coordinator.compression.sync_budget
    with pytest.raises(ValueError, match="averaging_share"):
        Schedule(2, 2, B, averaging_share=1.0)
