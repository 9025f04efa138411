"""Which attempt at a driver's step the gradients a stage holds belong to.

A driver retries a failed step on the same microbatches. By then a remote stage may already
hold gradients of the failed attempt's microbatches that did get through: kept, they would be
counted twice, and the stage would step early, out of phase with the driver for the rest
of the run. So every backward a driver sends carries a `StepTag`, and each stage keeps a
`StepLedger`: when a driver's new attempt at a step arrives, the stage drops what earlier
attempts at that step left, and work of an attempt the driver has given up on (an earlier
attempt at a step a later one has reached) is refused.

Attempts are judged per step, not against the driver's latest call, because a driver may
overlap two steps (worker.pipeline.driver: `overlap_steps`): the next step's microbatches,
with the next attempt number, can reach a stage before this step's last one.

What cannot be undone, and is only counted:
- the stage already stepped on the failed attempt's microbatches (every one of them got
  through and the driver failed after, e.g. its own backward or a lost answer);
- the stage's pending gradient mixes several drivers' microbatches (several stage-0 replicas
  feed one replica), or several steps of one driver: one share cannot be taken out of a sum,
  so it stays;
- microbatches sent on early for the step after one that failed: they can be dropped only when
  that step's next attempt arrives, and only if they are then all the stage holds.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
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
class _DriverAttempts:
    """What a stage remembers of one driver."""

    session: int
    attempts: dict[int, int] = field(default_factory=dict)  # step -> its latest attempt seen
    pending: dict[tuple[int, int], int] = field(default_factory=dict)  # (step, attempt) -> unstepped samples


@dataclass
class LedgerStats:
    dropped_samples: int = 0  # a failed attempt's samples taken out before they were stepped on
    kept_stale_samples: int = 0  # a failed attempt's samples mixed with other samples (kept)
    refused_stale: int = 0  # calls of a superseded attempt, refused


STEPS_REMEMBERED = 16  # per driver: the attempts of its latest steps (overlap spans two)


class StepLedger:
    """Each driver's latest attempt at its recent steps, and its samples in the pending gradient (pure).
    A driver is named by its peer id (base58)."""

    def __init__(self) -> None:
        self._drivers: OrderedDict[str, _DriverAttempts] = OrderedDict()  # by peer id
        self.stats = LedgerStats()

    def admit(self, driver: str, tag: StepTag, pending_samples: int) -> Verdict:
        """What to do with a backward of `driver` tagged `tag`, with `pending_samples` unstepped."""
        known = self._drivers.get(driver)
        if known is None or known.session != tag.session:
            known = _DriverAttempts(tag.session)
            self._remember(driver, known)
        self._drivers.move_to_end(driver)
        latest = known.attempts.get(tag.step)
        if latest is not None and tag.attempt < latest:
            self.stats.refused_stale += 1
            return Verdict.STALE
        verdict = Verdict.ACCUMULATE
        if latest is None or tag.attempt > latest:
            known.attempts[tag.step] = tag.attempt
            for step in sorted(known.attempts)[:-STEPS_REMEMBERED]:
                del known.attempts[step]
            # what earlier attempts at this step left (a retry, or an overlapped microbatch whose
            # step failed before it): dropped if it is all the stage holds, else counted
            left = [key for key in known.pending if key[0] == tag.step and key[1] < tag.attempt]
            stale = sum(known.pending.pop(key) for key in left)
            if stale and stale == pending_samples:
                self.stats.dropped_samples += stale
                verdict = Verdict.DROP_PENDING
            else:
                self.stats.kept_stale_samples += stale
        return verdict

    def accumulated(self, driver: str, tag: StepTag | None, samples: int) -> None:
        known = self._drivers.get(driver)
        if tag is not None and known is not None and known.session == tag.session:
            key = (tag.step, tag.attempt)
            known.pending[key] = known.pending.get(key, 0) + samples

    def cleared(self) -> None:
        """The stage stepped, or dropped its gradient: nobody's samples are pending."""
        for known in self._drivers.values():
            known.pending.clear()

    def _remember(self, driver: str, entry: _DriverAttempts) -> None:
        self._drivers[driver] = entry
        self._drivers.move_to_end(driver)
        while len(self._drivers) > MAX_DRIVERS:
            self._drivers.popitem(last=False)
