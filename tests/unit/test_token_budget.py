"""The run's token budget: grants to stage 0's replicas never promise more than it holds."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.swarm.budget import MIN_GRANT_STEPS, TokenBudget
from worker.telemetry.counters import CounterBook

STEP = 2048


def test_a_driver_without_a_measured_rate_gets_a_few_steps_then_a_leases_worth() -> None:
    budget = TokenBudget(total=10**9, step_tokens=STEP, horizon_s=30.0)
    assert budget.grant("a", 0.0) == MIN_GRANT_STEPS * STEP
    budget.note_driven("a", 3 * STEP)
    # measured 10k tokens/s over a 30 s lease: 300k tokens, in whole steps
    left = budget.grant("a", 10_000.0)
    assert left % STEP == 0 and 300_000 <= left < 300_000 + STEP
    assert budget.available == 10**9 - 3 * STEP - left


def test_the_tail_is_shared_between_drivers_and_the_end_is_within_a_step() -> None:
    budget = TokenBudget(total=40 * STEP + 100, step_tokens=STEP, horizon_s=30.0)
    for driver in "ab":  # both drive already: each holds a first grant
        budget.note_driven(driver, 0)
        budget.grant(driver, 0.0)
    assert budget.available == 40 * STEP + 100 - 2 * MIN_GRANT_STEPS * STEP
    budget.note_driven("a", MIN_GRANT_STEPS * STEP)
    a = budget.grant("a", 1e6)  # wants far more than is left: gets half of the rest, not all
    assert a == 13 * STEP, a  # 24 steps and 100 tokens are unpromised: half, in whole steps, rounded up
    b = budget.grant("b", 1e6)
    assert b > MIN_GRANT_STEPS * STEP  # b is topped up from what a left
    while not budget.reached:
        for driver in "ab":
            budget.note_driven(driver, budget.outstanding.get(driver, 0))
            budget.grant(driver, 1e6)
    assert budget.driven - budget.total < 2 * STEP  # within one step per driver
    assert budget.grant("a", 1e6) == 0 and budget.available == 0  # nothing left to hand out


def test_a_driver_that_left_gives_its_unused_grant_back() -> None:
    budget = TokenBudget(total=100 * STEP, step_tokens=STEP, horizon_s=30.0)
    budget.grant("a", 1e6)
    budget.grant("b", 1e6)
    assert budget.available == 0
    budget.release({"b"})  # a re-plan moved "a" off stage 0
    assert budget.available > 0 and "a" not in budget.outstanding


@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 200 * STEP), events=st.lists(
    st.tuples(st.sampled_from("abc"), st.floats(0, 1e5), st.integers(0, 40)), max_size=60))
def test_grants_never_pass_the_budget_by_a_step_per_driver(total: int, events: list) -> None:
    budget = TokenBudget(total=total, step_tokens=STEP, horizon_s=30.0)
    used: dict[str, int] = {}
    for driver, rate, steps in events:
        left = budget.grant(driver, rate)
        drive = min(left, steps * STEP)  # a driver never passes its grant
        budget.note_driven(driver, drive)
        used[driver] = used.get(driver, 0) + drive
    assert sum(used.values()) == budget.driven
    assert budget.driven + sum(budget.outstanding.values()) < total + 3 * STEP


def test_the_worker_drives_only_within_its_grant_counted_from_what_it_reported() -> None:
    book = CounterBook()
    assert book.may_drive(STEP)  # no grant yet: nothing limits it
    book.add_work(tokens=STEP, samples=16)
    book.take_delta()  # the heartbeat reports one step...
    book.add_work(tokens=STEP, samples=16)  # ...and one more is trained while it is in flight
    book.grant_tokens(2 * STEP)  # the reply: two steps more than the reported one
    assert book.may_drive(STEP)
    book.add_work(tokens=STEP, samples=16)
    assert not book.may_drive(STEP)
    delta = book.take_delta()
    book.restore(delta)  # a lost heartbeat: its tokens were not reported after all
    book.grant_tokens(4 * STEP)
    assert book.may_drive(STEP) and not book.may_drive(3 * STEP)
