"""Who leads a stage's averaging rounds, and standing in for a silent leader (worker.replicas.leadership)."""

from __future__ import annotations

from worker.replicas.leadership import TAKEOVER_GAPS, LeaderWatch


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def watches(ids: list[str], clock: Clock, floor_s: float = 30.0) -> dict[str, LeaderWatch]:
    return {me: LeaderWatch(me, floor_s=floor_s, clock=clock) for me in ids}


def others(me: str, ids: list[str]) -> list[str]:
    return [i for i in ids if i != me]


IDS = ["A", "B", "C", "D"]  # base58 peer ids sort as strings: A leads while it leads


def test_the_lowest_id_leads_the_replicas_above_it_and_the_others_follow() -> None:
    clock = Clock()
    w = watches(IDS, clock)
    assert w["A"].followers(others("A", IDS)) == ["B", "C", "D"]
    for me in "BCD":
        assert w[me].followers(others(me, IDS)) is None
        assert w[me].silent_leader(others(me, IDS)) is None


def test_a_leader_whose_rounds_keep_coming_is_never_passed_over() -> None:
    clock = Clock()
    w = watches(IDS, clock)
    for _ in range(20):
        clock.now += 25.0  # rounds every 25 s: under the 30-s floor each time
        for me in "BCD":
            assert w[me].silent_leader(others(me, IDS)) is None
            w[me].heard()
    assert all(w[me].followers(others(me, IDS)) is None for me in "BCD")


def test_a_silent_leader_is_passed_over_after_the_floor_and_the_next_replica_leads() -> None:
    clock = Clock()
    w = watches(IDS, clock)
    clock.now += 29.0
    assert all(w[me].silent_leader(others(me, IDS)) is None for me in "BCD")
    clock.now += 2.0
    assert [w[me].silent_leader(others(me, IDS)) for me in "BCD"] == ["A", "A", "A"]
    assert w["B"].followers(others("B", IDS)) == ["C", "D"]  # B stands in, for those above it only
    assert w["C"].followers(others("C", IDS)) is None  # C and D now wait for B, with a full patience
    assert w["D"].followers(others("D", IDS)) is None
    clock.now += 29.0
    assert w["C"].silent_leader(others("C", IDS)) is None
    w["C"].heard()  # B's first round reaches C: C keeps following
    clock.now += 29.0
    assert w["C"].silent_leader(others("C", IDS)) is None


def test_silent_replicas_are_passed_over_one_at_a_time_each_with_a_full_patience() -> None:
    clock = Clock()
    d = LeaderWatch("D", floor_s=30.0, clock=clock)
    seen = []
    for _ in range(3):
        clock.now += 30.5
        seen.append(d.silent_leader(others("D", IDS)))
        assert d.silent_leader(others("D", IDS)) is None  # not two in one go
    assert seen == ["A", "B", "C"]
    assert d.followers(others("D", IDS)) == []  # the highest id, with every lower one silent: no round to lead


def test_patience_grows_with_the_gap_rounds_come_at() -> None:
    clock = Clock()
    b = LeaderWatch("B", floor_s=30.0, clock=clock)
    for _ in range(3):
        clock.now += 20.0
        b.heard()
    assert b.patience() == TAKEOVER_GAPS * 20.0
    clock.now += TAKEOVER_GAPS * 20.0 - 1  # slower than usual, but not silent yet
    assert b.silent_leader(["A", "C"]) is None
    clock.now += 2.0
    assert b.silent_leader(["A", "C"]) == "A"


def test_the_stage_period_sets_the_patience_before_any_round() -> None:
    clock = Clock()
    b = LeaderWatch("B", floor_s=30.0, clock=clock)
    clock.now += 100.0  # a 64-step period at 0.5 s a step: rounds come every 32 s at best
    assert b.silent_leader(["A"], expected_gap_s=32.0) is None
    clock.now += TAKEOVER_GAPS * 32.0 - 100.0 + 1
    assert b.silent_leader(["A"], expected_gap_s=32.0) == "A"


def test_a_passed_over_leader_that_begins_a_round_is_followed_again_and_the_stand_in_steps_down() -> None:
    clock = Clock()
    b = LeaderWatch("B", floor_s=30.0, clock=clock)
    clock.now += 31.0
    assert b.silent_leader(["A", "C"]) == "A"
    assert b.followers(["A", "C"]) == ["C"]
    assert b.accepts("A", ["A", "C"])  # A was only stalled: its begin reached us
    assert b.followers(["A", "C"]) is None
    assert b.passed == set()


def test_a_replica_follows_only_its_leader_so_one_broken_path_cannot_make_two_leaders() -> None:
    clock = Clock()
    b, c = LeaderWatch("B", floor_s=30.0, clock=clock), LeaderWatch("C", floor_s=30.0, clock=clock)
    clock.now += 20.0
    assert c.accepts("A", ["A", "B", "D"])  # A's rounds reach C, but not B
    clock.now += 20.0
    assert b.silent_leader(["A", "C", "D"]) == "A"  # B hears nothing from A: it stands in
    assert c.silent_leader(["A", "B", "D"]) is None  # C heard A 20 s ago
    assert not c.accepts("B", ["A", "B", "D"])  # and refuses the stand-in while it follows A
    assert not c.accepts("D", ["A", "B", "D"])  # a higher id never leads C
    assert c.accepts("A", ["A", "B", "D"])


def test_a_begin_from_the_leader_counts_as_a_sign_of_life_even_when_its_round_fails_here() -> None:
    clock = Clock()
    c = LeaderWatch("C", floor_s=30.0, clock=clock)
    for _ in range(5):
        clock.now += 25.0
        assert c.accepts("A", ["A", "B"])  # our answers come too late for A: no round completes here
        assert c.silent_leader(["A", "B"]) is None


def test_the_silence_before_a_pass_over_does_not_stretch_the_patience_for_the_next_leader() -> None:
    clock = Clock()
    c = LeaderWatch("C", floor_s=30.0, clock=clock)
    for _ in range(4):
        clock.now += 10.0
        c.heard()
    assert c.patience() == 40.0
    clock.now += 41.0
    assert c.silent_leader(["A", "B"]) == "A"
    clock.now += 5.0
    c.heard()  # B's first round
    assert c.patience() == 40.0


def test_a_replica_that_left_the_stage_is_forgotten() -> None:
    clock = Clock()
    c = LeaderWatch("C", floor_s=30.0, clock=clock)
    clock.now += 31.0
    assert c.silent_leader(["A", "B"]) == "A"
    assert c.passed == {"A"}
    c.silent_leader(["B"])  # A left the stage
    assert c.passed == set()
    assert c.followers(["B"]) is None  # B, the lowest id now, leads


def test_the_wait_starts_again_when_the_stage_takes_its_first_step() -> None:
    clock = Clock()
    b = LeaderWatch("B", floor_s=30.0, clock=clock)
    clock.now += 100.0  # the pipeline took this long to form: no round could come
    b.restart()
    clock.now += 29.0
    assert b.silent_leader(["A"]) is None
    clock.now += 2.0
    assert b.silent_leader(["A"]) == "A"
