"""The run's token budget, handed to stage 0's replicas in grants (pure: no I/O, no clock).

`training.total_tokens` is where a run ends. Only stage 0 starts steps, so only its replicas get
a say: each heartbeat from one tells it how many more tokens it may drive (`tokens_left`), and
the ledger never promises more than the budget holds. A driver that has used its grant waits for
the next one; at the end the grants run dry and the swarm stops within one step of the budget
(a grant is whole steps: the last one may pass the budget by less than a step).

Grants are sized to cover a coordinator outage as long as the lease: a driver trains on through
one, as it always has. Near the end the rest is split between the drivers, so none idles while
another holds the whole remainder.

The ledger counts the tokens stage 0 reports (`driven`); a restart begins it at the registry's
trained tokens, which the last stage reports, so a few in-flight microbatches' tokens may count
twice across a restart: the budget errs on ending early, never late.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from configs.schema import RunConfig

MIN_GRANT_STEPS = 8  # a driver whose rate is not measured yet gets this many steps at once


@dataclass
class TokenBudget:
    total: int  # training.total_tokens
    step_tokens: int  # tokens one optimizer step of stage 0 trains (batch_size × seq_len)
    horizon_s: float  # how long a grant should last at the driver's rate: the coordinator's lease
    driven: int = 0  # tokens stage 0 trained so far, as reported
    outstanding: dict[str, int] = field(default_factory=dict)  # driver -> granted, not yet reported

    @classmethod
    def for_run(cls, config: RunConfig, driven: int) -> TokenBudget:
        t = config.training
        return cls(t.total_tokens, t.tokens_per_step, config.coordinator.lease_s, driven)

    @property
    def reached(self) -> bool:
        return self.driven >= self.total

    @property
    def available(self) -> int:
        """Tokens nobody has been granted yet."""
        return max(0, self.total - self.driven - sum(self.outstanding.values()))

    def note_driven(self, worker_id: str, tokens: int) -> None:
        """A stage-0 heartbeat reported `tokens` trained since its last one."""
        self.driven += tokens
        if worker_id in self.outstanding:
            self.outstanding[worker_id] = max(0, self.outstanding[worker_id] - tokens)

    def rewind(self, driven: int) -> None:
        """The swarm went back to a checkpoint holding `driven` tokens: grants given for the
        rolled-back generation are void (their drivers are told to rebuild their stage)."""
        self.driven = driven
        self.outstanding.clear()

    def release(self, keep: set[str]) -> None:
        """Only `keep` drive now (a re-plan moved the others off stage 0, or they left): their
        unused grants go back to the budget."""
        for worker_id in list(self.outstanding):
            if worker_id not in keep:
                del self.outstanding[worker_id]

    def grant(self, worker_id: str, tokens_per_s: float) -> int:
        """Top up the driver's grant to cover `horizon_s` at its rate; the tokens it may now drive.
        The drivers are those holding a grant (`release` keeps them current), and this one."""
        drivers = len(self.outstanding) + (worker_id not in self.outstanding)
        steps_wanted = max(MIN_GRANT_STEPS, math.ceil(tokens_per_s * self.horizon_s / self.step_tokens))
        have = self.outstanding.get(worker_id, 0)
        want = steps_wanted * self.step_tokens - have
        if want > 0 and self.available > 0:
            # the tail is shared: at most an even split of what is left, in whole steps, at least one
            fair = math.ceil(self.available / max(1, drivers) / self.step_tokens) * self.step_tokens
            have += max(self.step_tokens, min(want, fair))
            self.outstanding[worker_id] = have
        return have
