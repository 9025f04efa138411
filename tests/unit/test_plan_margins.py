"""A plan's margins (coordinator.planning.margins): memory of the smallest card, the busiest
link's use at the plan's rate, and what bounds each stage, checked against hand arithmetic."""

from __future__ import annotations

import pytest

from configs.link import Link
from coordinator.planning.margins import stage_margins
from coordinator.planning.plan import Plan
from coordinator.planning.planner import WorkerCapacity, evaluate
from tests.harness.planner_reference import small_profile

GB = 10**9


def test_margins_follow_the_rate_model_by_hand() -> None:
    profile = small_profile(4)
    fast, thin = Link.from_mbps(10_000), Link.from_mbps(10)
    workers = [
        WorkerCapacity("a", 1e14, 40 * GB, fast), WorkerCapacity("b", 1e14, 24 * GB, fast),  # stage 0
        WorkerCapacity("c", 1e14, 80 * GB, thin),  # stage 1, on a thin link
    ]
    stage_of = {"a": 0, "b": 0, "c": 1}
    rates = evaluate(profile, workers, (0, 2, 4), stage_of)
    plan = Plan((0, 2, 4), stage_of, rates)
    first, last = stage_margins(profile, workers, plan)

    cost0 = profile.stage_cost(0, 2)
    assert first.memory_bytes == cost0.train_memory_bytes and first.smallest_card_bytes == 24 * GB
    assert first.memory_use == pytest.approx(cost0.train_memory_bytes / (24 * GB))
    assert first.tight == (first.memory_use > 0.9)
    # stage 1's one worker is bound by its 10 Mbit/s link, and runs it full: it is the slowest stage
    assert last.bound == "link" and plan.rate == rates[1]
    assert last.link_use == pytest.approx(1.0)
    # stage 0's workers compute; they train only the slowest stage's tokens, at a small share of their links
    per_token = cost0.activation_bytes_per_token  # one crossing at the first stage
    share = plan.rate / rates[0]
    own = 1e14 / cost0.train_flops_per_token
    assert first.bound == "compute"
    assert first.link_use == pytest.approx(own * share * per_token / fast.bottleneck_bytes_per_s)


def test_a_stage_without_workers_is_refused() -> None:
    profile = small_profile(2)
    workers = [WorkerCapacity("a", 1e14, 80 * GB, Link.from_mbps(100))]
    with pytest.raises(ValueError, match="stage 1 of the plan has no worker"):
        stage_margins(profile, workers, Plan((0, 1, 2), {"a": 0}, (1.0, 0.0)))
