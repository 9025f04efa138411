"""Who leads a stage's averaging rounds, and passing over a leader that went silent.

The replica whose peer id sorts first leads its stage's rounds (worker.replicas.sync_round), so
every replica can tell without talking to the others. But a leader can stay listed and start
no round: its process hangs while its heartbeats go on, its path to the others broke, or it
withholds rounds on purpose (it picked the lowest id by grinding keys). Its stage would then
never average again, and its replicas would drift apart for as long as it stays.

So each replica watches for its leader: the lowest id below its own that it has not passed
over. When no round from it has begun here for `patience()` (TAKEOVER_GAPS x the gap its
rounds came at, and at least `floor_s`), the replica passes it over and waits for the next
one; a replica that has passed over every lower id leads, among the replicas above it. Every
replica measures the same silence, so they pass over the same peer at about the same time.

A replica follows only its leader (`accepts`): a stand-in's begin is refused by a replica
that still hears the real leader, so one replica's broken path to the leader cannot put two
leaders over the others. A passed-over peer that begins a round is followed again at once:
one that only stalled leads again, and the replica that stood in for it stops leading.
Requests still only go from a lower id to a higher one.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

TAKEOVER_FLOOR_S = 30.0  # never pass a leader over sooner (training.leader_takeover_s sets it in a swarm)
TAKEOVER_GAPS = 4.0  # rounds missed in a row before the leader is passed over
_GAPS_KEPT = 8  # the longest of the last few gaps between rounds sets the patience


class LeaderWatch:
    """One replica's view of who leads its stage's rounds; `clock` is monotonic seconds."""

    def __init__(self, me: str, *, floor_s: float = TAKEOVER_FLOOR_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.me, self.floor_s, self._clock = me, floor_s, clock
        self.passed: set[str] = set()  # lower ids we stopped waiting for
        self._waiting_since = clock()  # since when our leader began no round here
        self._last_round: float | None = None
        self._gaps: deque[float] = deque(maxlen=_GAPS_KEPT)

    def accepts(self, leader: str, others: Sequence[str]) -> bool:
        """Whether to answer `leader`'s begin, one of `others` (the stage's other replicas, lower
        ids only ever lead higher ones): our leader's, counted as a sign of life, or a
        passed-over peer's, which is our leader again from now on. Not a stand-in's while a
        lower replica we wait for may still lead."""
        if leader >= self.me:
            return False
        if leader in self.passed:
            self.passed.discard(leader)  # it is back: follow it again
        if leader != self._leader([*others, leader]):
            return False
        self._waiting_since = self._clock()
        return True

    def restart(self) -> None:
        """Wait for our leader from now on: our stage took its first step, and rounds come only
        after steps (a pipeline can take long to form, and a replica to download its state)."""
        self._waiting_since = self._clock()

    def heard(self) -> None:
        """A round of our leader's ended here (its outcome was loaded): the gaps between rounds
        set the patience."""
        now = self._clock()
        if self._last_round is not None:
            self._gaps.append(now - self._last_round)
        self._last_round = self._waiting_since = now

    def silence(self) -> float:
        """Seconds since our leader last began a round here (or since we began waiting for it)."""
        return self._clock() - self._waiting_since

    def patience(self, expected_gap_s: float = 0.0) -> float:
        """How long to wait for our leader's round before passing it over. `expected_gap_s` is the
        gap the stage's period sets (its steps x their time): rounds may come that far apart."""
        gap = max([expected_gap_s, *self._gaps])
        return max(self.floor_s, TAKEOVER_GAPS * gap)

    def silent_leader(self, others: Sequence[str], expected_gap_s: float = 0.0) -> str | None:
        """Our leader, if it has been silent for longer than `patience()`: it is passed over from
        now on, and the next one gets a full patience. None while it is not."""
        self.passed &= set(others)  # a peer that left the stage is forgotten
        waiting_for = self._leader(others)
        if waiting_for is None or self.silence() <= self.patience(expected_gap_s):
            return None
        self.passed.add(waiting_for)
        self._waiting_since = self._clock()
        self._last_round = None  # the silence is no gap between rounds: it must not stretch the patience
        return waiting_for

    def followers(self, others: Sequence[str]) -> list[str] | None:
        """The replicas this one leads a round among (those above it), or None when a lower id
        that was not passed over leads."""
        if self._leader(others) is not None:
            return None
        return sorted(o for o in set(others) if o > self.me)

    def _leader(self, others: Sequence[str]) -> str | None:
        """The replica we follow: the lowest id below ours not passed over; None when we lead."""
        lower = [o for o in others if o < self.me and o not in self.passed]
        return min(lower) if lower else None


__all__ = ["TAKEOVER_FLOOR_S", "TAKEOVER_GAPS", "LeaderWatch"]
