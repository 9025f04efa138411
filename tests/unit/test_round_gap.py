"""How long a round's leader waits before the next round: rounds use at most a tenth of the link
with their bytes (except a leader's first few), and have a round open at most a third of the time; and
when a leader tries its next round (round_due)."""

from __future__ import annotations

import pytest

from worker.runtime.policy import FIRST_ROUND_STEPS, ROUND_LINK_SHARE, ROUND_TIME_SHARE, round_due, round_gap


def test_a_thin_link_spaces_rounds_by_their_bytes() -> None:
    # 1.72 MB both ways on 20 Mbit/s is 0.69 s of link: one round per 6.9 s keeps it to 10%
    gap = round_gap(1.6, 1_720_000, 2.5e6)
    assert gap == pytest.approx(1_720_000 / 2.5e6 / ROUND_LINK_SHARE - 1.6)
    assert (1_720_000 / 2.5e6) / (1.6 + gap) == pytest.approx(ROUND_LINK_SHARE)


def test_a_fast_link_spaces_rounds_by_their_time() -> None:
    # 10 MB on 10 Gbit/s is nothing; a 4 s round (lock waits, compute) still leaves 8 s free
    assert round_gap(4.0, 10_000_000, 1.25e9) == pytest.approx(4.0 * (1 / ROUND_TIME_SHARE - 1))


def test_an_unknown_link_counts_the_whole_round_as_link_time() -> None:
    assert round_gap(1.0, 123, None) == pytest.approx(1 / ROUND_LINK_SHARE - 1)
    assert round_gap(0.0, 0, None) == 0.0


def test_early_rounds_are_spaced_by_their_time_alone() -> None:
    # the thin link of the first test: 6.9 s between rounds later on, 3.2 s (a third of the time) early
    early = round_gap(1.6, 1_720_000, 2.5e6, early=True)
    assert early == pytest.approx(1.6 * (1 / ROUND_TIME_SHARE - 1))
    assert early < round_gap(1.6, 1_720_000, 2.5e6)
    # where the time share is what spaces rounds anyway, early changes nothing
    assert round_gap(4.0, 10_000_000, 1.25e9, early=True) == round_gap(4.0, 10_000_000, 1.25e9)


def test_a_leader_tries_its_first_round_early_then_when_the_gap_or_the_period_allows() -> None:
    assert not round_due(0, 64, 0, 100.0, 0.0)  # no step since the last round
    assert not round_due(FIRST_ROUND_STEPS - 1, 64, 0, 100.0, 0.0)
    assert round_due(FIRST_ROUND_STEPS, 64, 0, 100.0, 0.0)
    assert not round_due(FIRST_ROUND_STEPS, 64, 1, 100.0, 150.0)  # after a round led: its measured gap
    assert round_due(1, 64, 1, 150.0, 150.0)
    assert round_due(64, 64, 1, 100.0, 150.0)  # the period is up, whatever the gap
