"""Which attempt at a driver's step the gradients a stage holds belong to.

A driver retries a failed step on the same microbatches. By then a remote stage may already
hold gradients of the failed attempt's microbatches that did get through: kept, they would be
counted twice, and the stage would step early, out of phase with the driver for the rest
of the run. So every backward a driver sends carries a `StepTag`, and each stage keeps a
`StepLedger`: when a driver's new attempt at the same step arrives, the stage drops what the
earlier attempt left, and work of an attempt the driver has given up on is refused.

What cannot be undone, and is only counted:
- the stage already stepped on the failed attempt's microbatches (every one of them got
  through and the driver failed after, e.g. its own backward or a lost answer);
- the stage's pending gradient mixes several drivers' microbatches (several stage-0 replicas
  feed one replica): one driver's share cannot be taken out of a sum, so it stays.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

MAX_DRIVERS = 1024  # drivers remembered per stage; the oldest are forgotten first


@dataclass(frozen=True)
class StepTag:
    """A microbatch's place in its driver's training."""

    session: int  # drawn at random when the driver starts: a restarted driver is a new session
    step: int  # the driver's optimizer step this microbatch belongs to; the same on a retry
    attempt: int  # grows with every try at a step within the session

    def to_wire(self) -> list[int]:
        return [self.session, self.step, self.attempt]


class Verdict(Enum):
    ACCUMULATE = "accumulate"
    DROP_PENDING = "drop_pending"  # a retry: the pending gradient is all the failed attempt's
    STALE = "stale"  # an attempt the driver has already given up on


@dataclass
class _Driver:
    tag: StepTag
    pending: int = 0  # samples of this attempt in the stage's unstepped gradient


@dataclass
class LedgerStats:
    dropped_samples: int = 0  # a failed attempt's samples taken out before they were stepped on
    kept_stale_samples: int = 0  # a failed attempt's samples mixed with other drivers' (kept)
    refused_stale: int = 0  # calls of a superseded attempt, refused


class StepLedger:
    """The latest attempt of each driver, and each driver's samples in the pending gradient (pure)."""

    def __init__(self) -> None:
        self._drivers: OrderedDict[str, _Driver] = OrderedDict()
        self.stats = LedgerStats()

    def admit(self, driver: str, tag: StepTag, pending_samples: int) -> Verdict:
        """What to do with a backward of `driver` tagged `tag`, with `pending_samples` unstepped."""
        known = self._drivers.get(driver)
        if known is None or known.tag.session != tag.session:
            self._remember(driver, _Driver(tag))
            return Verdict.ACCUMULATE
        if tag.attempt < known.tag.attempt:
            self.stats.refused_stale += 1
            return Verdict.STALE
        verdict = Verdict.ACCUMULATE
        if tag.attempt > known.tag.attempt:
            if tag.step == known.tag.step and known.pending:  # a retry of a step that failed
                if known.pending == pending_samples:
                    self.stats.dropped_samples += known.pending
                    verdict = Verdict.DROP_PENDING
                else:
                    self.stats.kept_stale_samples += known.pending
            # a new attempt has nothing of its own pending yet; an earlier step's samples
            # still pending (the stage's steps need not line up with this driver's) are kept
            known.pending = 0
        known.tag = tag
        self._drivers.move_to_end(driver)
        return verdict

    def accumulated(self, driver: str, samples: int) -> None:
        if driver in self._drivers:
            self._drivers[driver].pending += samples

    def cleared(self) -> None:
        """The stage stepped, or dropped its gradient: nobody's samples are pending."""
        for known in self._drivers.values():
            known.pending = 0

    def _remember(self, driver: str, entry: _Driver) -> None:
        self._drivers[driver] = entry
        self._drivers.move_to_end(driver)
        while len(self._drivers) > MAX_DRIVERS:
            self._drivers.popitem(last=False)
