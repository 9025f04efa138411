"""The exact planner (coordinator.planning.exact): the brute-force optimum on fleets small enough
to try every split and assignment, and plans that the rate model, written out plainly, confirms
on GPT-J 6B's 28 layers and on the presets."""

from __future__ import annotations

import numpy as np
import pytest

from configs.loader import load_config
from configs.profile import model_profile
from coordinator.planning.exact import EXACT_MAX_WORKERS, exact_search
from coordinator.planning.planner import InfeasiblePlanError, evaluate, plan
from coordinator.planning.rate_model import Costs, Fleet
from tests.harness.fleets import catalog_fleet
from tests.harness.planner_reference import best_rate, hand_made_fleet, small_profile, worker_rate


@pytest.mark.parametrize("need", [1, 2])
def test_the_exact_search_finds_what_brute_force_finds(need: int) -> None:
    for seed in range(30):
        rng = np.random.default_rng(100 + seed)
        size, n_layer = int(rng.integers(1, 7)), int(rng.integers(3, 8))
        profile, workers = small_profile(n_layer), hand_made_fleet(rng, size)
        optimum = best_rate(profile, workers, size, need)
        found = exact_search(Costs(profile), Fleet(workers), need)
        if optimum == 0:
            assert found is None, f"seed {seed}: a plan where brute force finds none"
            continue
        assert found is not None and found.rate == pytest.approx(optimum, rel=1e-9), (seed, found, optimum)


def test_plans_of_up_to_eight_workers_are_optimal_and_what_the_rate_model_says() -> None:
    """120 seeded fleets of 1-8 catalog cards on GPT-J 6B, 'small' and 'tiny', each priced with its
    run's memory model: each plan's stage rates, recomputed worker by worker, are the ones it
    reports; every stage is served by workers that hold its peak; and no plan is slower than the
    exact optimum under the same rule."""
    configs = [load_config(name) for name in ("gptj-6b", "small", "tiny")]
    profiles = [model_profile(c.model, c.training.precision, c.training) for c in configs]
    checked = 0
    for seed in range(120):
        rng = np.random.default_rng(7000 + seed)
        profile = profiles[seed % 3]
        workers = catalog_fleet(rng, int(rng.integers(1, EXACT_MAX_WORKERS + 1)))
        costs, fleet = Costs(profile), Fleet(workers)
        optimum = exact_search(costs, fleet, 2) or exact_search(costs, fleet, 1)
        try:
            p = plan(profile, workers)
        except InfeasiblePlanError:
            assert optimum is None, f"seed {seed}: the planner refused a fleet that has a plan"
            continue
        assert optimum is not None
        rates = evaluate(profile, workers, p.boundaries, p.stage_of)
        assert rates == pytest.approx(p.stage_rates, rel=1e-9), seed
        assert min(rates) == pytest.approx(optimum.rate, rel=1e-9), seed
        by_id = {w.worker_id: w for w in workers}
        for stage, (start, end) in enumerate(zip(p.boundaries, p.boundaries[1:])):
            team = [by_id[w] for w, s in p.stage_of.items() if s == stage]
            assert team and all(worker_rate(profile, w, start, end, p.num_stages) > 0 for w in team), (seed, stage)
        checked += 1
    assert checked >= 100


def test_the_exact_search_refuses_a_fleet_it_would_take_too_long_on() -> None:
    workers = hand_made_fleet(np.random.default_rng(1), EXACT_MAX_WORKERS + 1)
    with pytest.raises(ValueError, match="at most"):
        exact_search(Costs(small_profile(4)), Fleet(workers), 1)
