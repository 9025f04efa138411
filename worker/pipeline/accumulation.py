"""A stage's pending gradient: what each backward adds to it, and the optimizer step it ends in.

A backward never half-applies: its gradients are computed into fresh tensors, checked finite,
and only then added to `.grad` (one transient gradient-sized buffer per call). When the
samples added since the last step reach `accumulate_samples`, the optimizer steps.

Whose step the pending gradient holds is the `StepLedger`'s to say (worker.pipeline.attempts):
a driver that retries a failed step tags its calls (`StepTag`), so a stage drops what the
failed attempt left in its gradient and refuses the rest of that attempt's work.

A microbatch is accumulated once: a driver asks a stage again when the stream closed without
an answer (worker.pipeline.failover), and the first ask may have been computed all the same.
A repeat of a tagged call (same driver, step, attempt and dropout seed: one microbatch) gets
its input gradient recomputed but adds nothing to the stage's gradient.

Not thread-safe: the stage's executor calls it one call at a time, under its lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import torch

from worker.pipeline.attempts import StepLedger, StepTag, Verdict
from worker.pipeline.errors import RequestRejected

TAKEN_REMEMBERED = 4096  # microbatches remembered as accumulated, newest kept: far more than a step holds

# one microbatch of one driver's attempt at a step: (driver, session, step, attempt, dropout seed)
Microbatch = tuple[str, int, int, int, int]


class AccumulationCounts(Protocol):
    """The counters accumulation keeps up to date (the stage's `StageStats`)."""

    samples: int  # sequences whose gradients were accumulated
    tokens: int
    pending_samples: int  # accumulated since the last optimizer step
    steps: int
    repeats: int  # microbatches asked for again after they were accumulated


def microbatch(driver: str, tag: StepTag | None, seed: int | None) -> Microbatch | None:
    """What names one microbatch of a driver's step attempt: its tag and its dropout seed, which
    the driver draws per microbatch (None for an untagged call, which is never asked again)."""
    if tag is None or seed is None:
        return None
    return (driver, tag.session, tag.step, tag.attempt, seed)


class Accumulator:
    """Adds backward results to `params`' `.grad` and steps `optimizer` every `accumulate_samples`
    samples, counting into `counts`. `driver` arguments are the peer id of the driver whose call
    it is ("" for the driver's own stage, whose calls are never tagged)."""

    def __init__(
        self,
        params: list[torch.Tensor],
        optimizer: torch.optim.Optimizer,
        accumulate_samples: int,
        counts: AccumulationCounts,
        *,
        grad_clip: float | None = None,
        lr_at: Callable[[int], float] | None = None,
    ) -> None:
        self.params, self.optimizer, self.accumulate_samples = params, optimizer, accumulate_samples
        self.counts, self.grad_clip, self.lr_at = counts, grad_clip, lr_at
        self.ledger = StepLedger()  # which attempt at each driver's step the pending gradient holds
        self._taken: OrderedDict[Microbatch, None] = OrderedDict()  # accumulated: a repeat adds nothing

    def admit(self, driver: str, tag: StepTag | None) -> None:
        """Before computing a tagged call: refuse a superseded attempt, drop a failed one's leftovers."""
        if tag is None:
            return
        verdict = self.ledger.admit(driver, tag, self.counts.pending_samples)
        if verdict is Verdict.STALE:
            raise RequestRejected("stale", f"attempt {tag.attempt} at step {tag.step} was superseded")
        if verdict is Verdict.DROP_PENDING:
            self.drop_pending()

    def drop_pending(self) -> None:
        """Drop the gradient accumulated since the last step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.counts.pending_samples = 0
        self.ledger.cleared()

    def add(
        self, outputs: torch.Tensor, grad_outputs: torch.Tensor | None, inputs: torch.Tensor,
        driver: str = "", tag: StepTag | None = None, at: list[torch.Tensor] | None = None,
        once: Microbatch | None = None,
    ) -> torch.Tensor | None:
        """Backprop into fresh tensors, refuse non-finite results, then add to `.grad` and maybe step;
        the gradient wrt `inputs` (None for token ids). `at`: the parameter copies the forward ran
        on, if not the parameters themselves. `once`: the microbatch, if the caller may ask for it
        again; a repeat only gets its input gradient."""
        if once is not None and once in self._taken:
            self.counts.repeats += 1
            if not inputs.requires_grad:
                return None
            (grad_inputs,) = torch.autograd.grad(outputs, [inputs], grad_outputs=grad_outputs)
            return grad_inputs.detach()
        wrt = (self.params if at is None else at) + ([inputs] if inputs.requires_grad else [])
        grads = torch.autograd.grad(outputs, wrt, grad_outputs=grad_outputs, allow_unused=True)
        present = [g for g in grads if g is not None]
        if present and not bool(torch.stack([g.isfinite().all() for g in present]).all()):
            raise RequestRejected("non_finite", "the gradient is not finite; nothing was accumulated")
        for p, g in zip(self.params, grads[: len(self.params)], strict=True):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        batch, tokens = inputs.size(0), inputs.size(0) * inputs.size(1)
        self.counts.samples += batch
        self.counts.tokens += tokens
        self.counts.pending_samples += batch
        self.ledger.accumulated(driver, tag, batch)
        if once is not None:
            self._taken[once] = None
            if len(self._taken) > TAKEN_REMEMBERED:
                self._taken.popitem(last=False)
        if self.counts.pending_samples >= self.accumulate_samples:
            self._step()
        return grads[-1].detach() if inputs.requires_grad else None

    def _step(self) -> None:
        if self.lr_at is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(self.counts.steps)
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.counts.steps += 1
        self.drop_pending()


__all__ = ["TAKEN_REMEMBERED", "AccumulationCounts", "Accumulator", "Microbatch", "microbatch"]
