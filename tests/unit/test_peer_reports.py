"""The ban rule: which reports count, how often one reporter may strike, when strikes ban."""

from __future__ import annotations

import pytest

from coordinator.swarm.trust import STRIKE_WINDOW_S, Strike, add_strike, ban_verdict, credible


@pytest.mark.parametrize(
    ("reason", "reporter_stage", "target_stage", "expected"),
    [
        ("outlier", 1, 1, True),  # replicas of one stage average together
        ("outlier", 0, 1, False),  # a neighbour never sees another stage's updates
        ("non_finite", 0, 1, True),  # activations forward
        ("non_finite", 2, 1, True),  # gradients back
        ("non_finite", 1, 1, True),  # averaging within the stage
        ("non_finite", 0, 2, False),  # two boundaries apart: they never exchange tensors
        ("malformed", 1, 1, False),  # honest peers a release apart send these too
        ("unauthorized", 1, 1, False),  # a stale admission list refuses honest newcomers
        ("outlier", -1, -1, False),  # unassigned workers exchange nothing
        ("non_finite", 0, -1, False),
    ],
)
def test_only_reports_the_plan_makes_possible_are_credible(
    reason: str, reporter_stage: int, target_stage: int, expected: bool
) -> None:
    assert credible(reason, reporter_stage, target_stage) is expected


def test_one_reporter_strikes_at_most_once_per_gap_however_fast_it_beats() -> None:
    history: tuple[Strike, ...] = ()
    for i in range(10):  # ten beats in one second, gap 1 s: one strike
        history = add_strike(history, Strike("w-a", "outlier", 100.0 + i * 0.1), min_gap_s=1.0)
    assert len(history) == 1
    history = add_strike(history, Strike("w-a", "outlier", 101.0), min_gap_s=1.0)
    assert len(history) == 2
    # another reporter is not held back by the first one's gap
    history = add_strike(history, Strike("w-b", "non_finite", 101.1), min_gap_s=1.0)
    assert [s.reporter for s in history] == ["w-a", "w-a", "w-b"]


def test_old_strikes_are_forgotten() -> None:
    history = (Strike("w-a", "outlier", 0.0), Strike("w-a", "outlier", 10.0))
    later = add_strike(history, Strike("w-a", "outlier", STRIKE_WINDOW_S + 5.0), min_gap_s=1.0)
    assert [s.at for s in later] == [10.0, STRIKE_WINDOW_S + 5.0]


def test_verdict_needs_the_threshold_from_live_reporters() -> None:
    strikes = [Strike("w-a", "outlier", float(t)) for t in range(4)]
    assert ban_verdict(strikes, 5, {"w-a"}) is None
    strikes.append(Strike("w-b", "outlier", 4.0))
    assert ban_verdict(strikes, 5, {"w-a", "w-b"}) == "5 outlier reports from 2 peers"
    # a reporter that was banned or left takes its accusations with it
    assert ban_verdict(strikes, 5, {"w-b"}) is None
    assert ban_verdict(strikes, 0, {"w-a", "w-b"}) is None  # 0: never ban


def test_verdict_names_mixed_reasons_and_a_single_peer() -> None:
    strikes = [Strike("w-a", "outlier", 0.0), Strike("w-a", "non_finite", 1.0), Strike("w-a", "outlier", 2.0)]
    assert ban_verdict(strikes, 3, {"w-a"}) == "3 reports (1 non_finite, 2 outlier) from 1 peer"
