"""What a stage does with a backward, given the driver's step and attempt (worker.pipeline.attempts)."""

from __future__ import annotations

from worker.pipeline.attempts import MAX_DRIVERS, StepLedger, StepTag, Verdict

A, B = "driver-a", "driver-b"


def test_a_step_that_completes_keeps_accumulating_and_the_next_step_starts_clean() -> None:
    ledger = StepLedger()
    assert ledger.admit(A, StepTag(7, 1, 1), pending_samples=0) is Verdict.ACCUMULATE
    ledger.accumulated(A, StepTag(7, 1, 1), 4)
    assert ledger.admit(A, StepTag(7, 1, 1), pending_samples=4) is Verdict.ACCUMULATE
    ledger.accumulated(A, StepTag(7, 1, 1), 4)
    ledger.cleared()  # the stage stepped
    assert ledger.admit(A, StepTag(7, 2, 2), pending_samples=0) is Verdict.ACCUMULATE
    assert ledger.stats.dropped_samples == ledger.stats.kept_stale_samples == 0


def test_a_retry_drops_what_the_failed_attempt_left_and_refuses_its_stragglers() -> None:
    ledger = StepLedger()
    ledger.admit(A, StepTag(7, 3, 5), 0)
    ledger.accumulated(A, StepTag(7, 3, 5), 4)
    assert ledger.admit(A, StepTag(7, 3, 6), pending_samples=4) is Verdict.DROP_PENDING
    ledger.cleared()
    assert ledger.stats.dropped_samples == 4
    # a call of the failed attempt that was still computing when the retry began
    assert ledger.admit(A, StepTag(7, 3, 5), pending_samples=0) is Verdict.STALE
    assert ledger.stats.refused_stale == 1
    # the retry's own microbatches accumulate, and a second microbatch of it is no retry
    assert ledger.admit(A, StepTag(7, 3, 6), pending_samples=0) is Verdict.ACCUMULATE
    ledger.accumulated(A, StepTag(7, 3, 6), 4)
    assert ledger.admit(A, StepTag(7, 3, 6), pending_samples=4) is Verdict.ACCUMULATE


def test_another_drivers_samples_in_the_sum_keep_a_failed_attempts_share_and_count_it() -> None:
    ledger = StepLedger()
    ledger.admit(A, StepTag(7, 3, 5), 0)
    ledger.accumulated(A, StepTag(7, 3, 5), 4)
    ledger.admit(B, StepTag(9, 10, 10), 4)
    ledger.accumulated(B, StepTag(9, 10, 10), 4)
    assert ledger.admit(A, StepTag(7, 3, 6), pending_samples=8) is Verdict.ACCUMULATE
    assert ledger.stats.kept_stale_samples == 4 and ledger.stats.dropped_samples == 0


def test_samples_of_an_earlier_completed_step_are_never_dropped() -> None:
    """The stage's steps need not line up with this driver's: its step 3 ended inside the stage's
    step, and then its step 4 failed halfway. Only step 4's share is stale, so nothing is dropped."""
    ledger = StepLedger()
    ledger.admit(A, StepTag(7, 3, 3), 0)
    ledger.accumulated(A, StepTag(7, 3, 3), 4)
    ledger.admit(A, StepTag(7, 4, 4), 4)
    ledger.accumulated(A, StepTag(7, 4, 4), 4)
    assert ledger.admit(A, StepTag(7, 4, 5), pending_samples=8) is Verdict.ACCUMULATE
    assert ledger.stats.kept_stale_samples == 4 and ledger.stats.dropped_samples == 0


def test_a_restarted_driver_starts_a_new_session_and_is_never_taken_for_a_straggler() -> None:
    ledger = StepLedger()
    ledger.admit(A, StepTag(7, 50, 60), 0)
    assert ledger.admit(A, StepTag(8, 1, 1), pending_samples=0) is Verdict.ACCUMULATE
    assert ledger.stats.refused_stale == 0


def test_the_ledger_forgets_the_least_recent_drivers_beyond_its_bound() -> None:
    ledger = StepLedger()
    for i in range(MAX_DRIVERS + 10):
        ledger.admit(f"d{i}", StepTag(1, 1, 2), 0)
    # the first drivers are forgotten: their superseded attempts are no longer recognised
    assert ledger.admit("d0", StepTag(1, 1, 1), 0) is Verdict.ACCUMULATE
    assert ledger.admit(f"d{MAX_DRIVERS + 9}", StepTag(1, 1, 1), 0) is Verdict.STALE


def test_an_overlapped_step_keeps_both_steps_samples_and_refuses_nothing() -> None:
    """The driver sent step 6's first microbatch (attempt 6) before step 5's last (attempt 5)."""
    ledger = StepLedger()
    ledger.admit(A, StepTag(7, 5, 5), 0)
    ledger.accumulated(A, StepTag(7, 5, 5), 8)
    assert ledger.admit(A, StepTag(7, 6, 6), pending_samples=8) is Verdict.ACCUMULATE
    ledger.accumulated(A, StepTag(7, 6, 6), 8)
    assert ledger.admit(A, StepTag(7, 5, 5), pending_samples=16) is Verdict.ACCUMULATE
    assert ledger.stats == type(ledger.stats)()  # nothing dropped, kept stale or refused


def test_a_retry_after_an_overlapped_microbatch_drops_only_a_gradient_that_is_all_stale() -> None:
    """Step 5 failed after step 6's first microbatch got through: that one is stale too."""
    ledger = StepLedger()
    ledger.admit(A, StepTag(7, 6, 6), 0)
    ledger.accumulated(A, StepTag(7, 6, 6), 8)
    # the retry of step 5 cannot take step 6's orphan out; step 6's next attempt can
    assert ledger.admit(A, StepTag(7, 5, 7), pending_samples=8) is Verdict.ACCUMULATE
    assert ledger.admit(A, StepTag(7, 6, 8), pending_samples=8) is Verdict.DROP_PENDING
    assert ledger.stats.dropped_samples == 8
    # and the orphan's attempt is now refused at its step, not at others
    assert ledger.admit(A, StepTag(7, 6, 6), pending_samples=0) is Verdict.STALE
    assert ledger.admit(A, StepTag(7, 5, 7), pending_samples=0) is Verdict.ACCUMULATE
