"""One stage's compute: stateless forward/backward on checked inputs, under one lock.

`StageServer` puts it behind P2P handlers; `PipelineDriver` runs its own first stage
through it. Stateless, as in SWARM: a remote stage keeps nothing between a microbatch's
forward and backward. `backward` gets the inputs again and recomputes the forward with
grad enabled, so any replica can serve any backward, and a replica that dies loses only
the microbatches it was computing. The price is one extra forward per stage per microbatch.

Concurrency: handlers for many microbatches run at once, but all compute of one stage runs
one call at a time, in a worker thread. One device gains nothing from two overlapping
streams of kernels, and strict order is what keeps an optimizer step from
landing between a backward's gradient and its accumulation, or under a forward that is
reading the weights. The thread keeps the event loop free to move bytes for the next
microbatch while this one computes. An asyncio.Lock queues the calls without tying up
threads; a threading.Lock inside the thread still holds if the awaiting task is cancelled
(a caller timed out) while its thread runs on.

Inputs are checked before any compute (worker.pipeline.checks). What a backward adds to the
stage's gradient, once and whole, which driver's attempt it belongs to, and the optimizer
step are the `Accumulator`'s (worker.pipeline.accumulation).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch

from worker.model.precision import autocast_for
from worker.model.stage import StageModule
from worker.pipeline.accumulation import TAKEN_REMEMBERED, Accumulator, Microbatch, microbatch
from worker.pipeline.attempts import StepTag
from worker.pipeline.checks import (
    IGNORE_INDEX,
    check_grad_outputs,
    check_inputs,
    check_targets,
    refuse_non_finite,
)
from worker.pipeline.errors import RequestRejected

T = TypeVar("T")


@dataclass
class StageStats:
    """Counters of one stage, for metrics and tests. Bytes are counted by StageServer."""

    forward_calls: int = 0
    backward_calls: int = 0  # backward, forward_backward and local backward calls
    samples: int = 0  # sequences whose gradients were accumulated
    tokens: int = 0
    pending_samples: int = 0  # accumulated since the last optimizer step
    steps: int = 0
    compute_s: float = 0.0
    rejected: int = 0
    repeats: int = 0  # microbatches asked for again after they were accumulated: answered, not re-added
    in_flight: int = 0  # requests being handled right now (StageServer)
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass
class KeptForward:
    """A local forward whose autograd graph is kept for its backward (the driver's own stage)."""

    inputs: torch.Tensor
    outputs: torch.Tensor
    params: list[torch.Tensor] | None = None  # the copies it ran on (`forward_keep(on=...)`)


class ParameterCopy:
    """A stage's parameters as they were when the first forward using this copy ran."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] | None = None


class StageExecutor:
    """Runs forward/backward for `stage` and steps `optimizer` every `accumulate_samples` samples.

    Gradient scale: the last stage multiplies each microbatch's mean loss by
    samples / accumulate_samples, so the accumulated gradient is the mean over the step's
    samples, as local training's `loss / accumulation` makes it. Stages before it receive
    already-scaled output gradients.

    `grad_clip` clips this stage's gradient norm only. Local training clips the norm of the
    whole model's gradient; per-stage clipping bounds each stage separately, so the two
    agree only when no clip triggers (the parity tests run unclipped).
    """

    def __init__(
        self,
        stage: StageModule,
        optimizer: torch.optim.Optimizer,
        accumulate_samples: int,
        *,
        grad_clip: float | None = None,
        lr_at: Callable[[int], float] | None = None,
        max_tokens: int | None = None,
        precision: str = "fp32",
    ) -> None:
        if accumulate_samples < 1:
            raise ValueError(f"accumulate_samples must be >= 1 (got {accumulate_samples})")
        self.stage = stage
        self.optimizer = optimizer
        self.accumulate_samples = accumulate_samples
        # a microbatch larger than a whole step of full-length sequences is never legitimate
        self.max_tokens = max_tokens if max_tokens is not None else accumulate_samples * stage.config.n_ctx
        self.stats = StageStats()
        params = [p for p in stage.parameters() if p.requires_grad]
        self.accumulator = Accumulator(params, optimizer, accumulate_samples, self.stats,
                                       grad_clip=grad_clip, lr_at=lr_at)
        self.ledger = self.accumulator.ledger  # which attempt at each driver's step the gradient holds
        ref = next(stage.parameters())
        self._device, self._dtype = ref.device, ref.dtype
        self.precision = precision  # training.precision: autocast on a GPU (worker/model/precision.py)
        self._queue = asyncio.Lock()
        self._mutex = threading.Lock()
        # A driver's step keeps autograd graphs between its forward and backward: replacing the
        # parameters then would break them. `exclusive` waits for no step to be running and
        # keeps new ones from starting until it is done.
        self._steps_running = 0
        self._no_step = asyncio.Event()
        self._no_step.set()
        self._exclusive_waiting = 0
        self._no_exclusive = asyncio.Event()
        self._no_exclusive.set()

    # ---- the calls ---------------------------------------------------------------------

    async def forward(self, inputs: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """Outputs for `inputs`, without grad: hidden states, or logits from the last stage."""
        x = self.check_inputs(inputs)
        self.stats.forward_calls += 1

        def run() -> torch.Tensor:
            with torch.no_grad(), self._dropout_seed(seed), self._autocast():
                outputs = self.stage(x)
            refuse_non_finite(outputs)
            return outputs

        return await self._compute(run)

    async def backward(
        self, inputs: torch.Tensor, grad_outputs: torch.Tensor, seed: int | None = None,
        tag: StepTag | None = None, driver: str = "",
    ) -> torch.Tensor | None:
        """Recompute the forward, accumulate parameter grads; the grad wrt inputs (None for token ids).

        `tag` and `driver` (the calling driver's peer id) say whose step the microbatch belongs
        to (see `StepLedger`)."""
        x = self.check_inputs(inputs)
        g = self._check_grad_outputs(grad_outputs, x)
        self.stats.backward_calls += 1

        def run() -> torch.Tensor | None:
            self.accumulator.admit(driver, tag)
            x_ = x.detach().requires_grad_(x.is_floating_point())
            with torch.enable_grad(), self._dropout_seed(seed), self._autocast():
                outputs = self.stage(x_)
            return self.accumulator.add(outputs, g, x_, driver, tag, once=microbatch(driver, tag, seed))

        return await self._compute(run)

    async def forward_backward(
        self, inputs: torch.Tensor, targets: torch.Tensor, seed: int | None = None,
        tag: StepTag | None = None, driver: str = "",
    ) -> tuple[float, torch.Tensor | None]:
        """Last stage: (mean loss, grad wrt inputs), accumulating parameter grads of the scaled loss."""
        if not self.stage.is_last:
            raise RequestRejected("bad_request", "forward_backward is served by the last stage only")
        x = self.check_inputs(inputs)
        y = self._check_targets(targets, x)
        self.stats.backward_calls += 1
        # as an exact float division, so a power-of-two accumulation matches local training bit for bit
        scale_divisor = self.accumulate_samples / x.size(0)

        def run() -> tuple[float, torch.Tensor | None]:
            self.accumulator.admit(driver, tag)
            x_ = x.detach().requires_grad_(x.is_floating_point())
            with torch.enable_grad(), self._dropout_seed(seed), self._autocast():
                loss = self.stage.loss(self.stage(x_), y)
            grad_inputs = self.accumulator.add(loss / scale_divisor, None, x_, driver, tag,
                                               once=microbatch(driver, tag, seed))
            return loss.item(), grad_inputs

        return await self._compute(run)

    async def forward_keep(self, inputs: torch.Tensor, on: ParameterCopy | None = None) -> tuple[torch.Tensor, KeptForward]:
        """Forward with grad, keeping the graph for `backward_kept`: for a stage that lives in the
        caller's process, where keeping activations is cheaper than recomputing them.

        on: run on a copy of the parameters (taken by the first forward that uses it), so that
        optimizer steps taken before the backward leave the graph valid; the backward's
        gradient, taken at the copy, is added to the parameters' (a stale gradient, for a
        driver overlapping two steps)."""
        x = self.check_inputs(inputs)
        self.stats.forward_calls += 1

        def run() -> tuple[torch.Tensor, KeptForward]:
            x_ = x.detach().requires_grad_(x.is_floating_point())
            params = None
            with torch.enable_grad(), self._autocast():
                if on is not None:
                    if on.tensors is None:
                        on.tensors = {name: p.detach().clone().requires_grad_(p.requires_grad)
                                      for name, p in self.stage.named_parameters()}
                    outputs = torch.func.functional_call(self.stage, on.tensors, (x_,))
                    params = [t for t in on.tensors.values() if t.requires_grad]
                else:
                    outputs = self.stage(x_)
            refuse_non_finite(outputs)
            return outputs.detach(), KeptForward(inputs=x_, outputs=outputs, params=params)

        return await self._compute(run)

    async def backward_kept(self, kept: KeptForward, grad_outputs: torch.Tensor) -> torch.Tensor | None:
        g = self._check_grad_outputs(grad_outputs, kept.inputs)
        self.stats.backward_calls += 1
        return await self._compute(lambda: self.accumulator.add(kept.outputs, g, kept.inputs, at=kept.params))

    def zero_grad(self) -> None:
        """Drop accumulated gradients (e.g. after a step that could not complete)."""
        with self._mutex:
            self.accumulator.drop_pending()

    async def exclusive(self, fn: Callable[[], T]) -> T:
        """Run `fn` in the worker thread while no other call computes and no `step()` is open:
        between two optimizer steps, never inside a backward or a step (for reading or replacing
        the parameters). Not counted as compute time."""
        self._exclusive_waiting += 1
        self._no_exclusive.clear()
        try:
            await self._no_step.wait()
            async with self._queue:
                return await asyncio.to_thread(self._exclusive, fn)
        finally:
            self._exclusive_waiting -= 1
            if not self._exclusive_waiting:
                self._no_exclusive.set()

    @contextlib.asynccontextmanager
    async def step(self) -> AsyncIterator[None]:
        """Mark a whole optimizer step (the driver's microbatches): `exclusive` waits for its end."""
        await self._no_exclusive.wait()
        self._steps_running += 1
        self._no_step.clear()
        try:
            yield
        finally:
            self._steps_running -= 1
            if not self._steps_running:
                self._no_step.set()

    def _exclusive(self, fn: Callable[[], T]) -> T:
        with self._mutex:
            return fn()

    # ---- compute, in the worker thread -------------------------------------------------

    async def _compute(self, fn: Callable[[], T]) -> T:
        async with self._queue:
            return await asyncio.to_thread(self._locked, fn)

    def _locked(self, fn: Callable[[], T]) -> T:
        with self._mutex:
            started = time.perf_counter()
            try:
                return fn()
            finally:
                self.stats.compute_s += time.perf_counter() - started

    def _autocast(self) -> contextlib.AbstractContextManager:
        # fp16 needs loss scaling agreed across the stages, which the pipeline does not do yet:
        # an fp16 run trains its pipeline in fp32 (bf16 needs no scaling)
        return autocast_for(self._device, "bf16" if self.precision == "bf16" else "fp32")

    @contextlib.contextmanager
    def _dropout_seed(self, seed: int | None) -> Iterator[None]:
        """Same dropout masks in a forward and its recomputation, when the caller sends a seed.

        Forks the global RNG: safe with one stage per process, as workers run; stages
        sharing a process (tests) may see each other's draws, which costs determinism only.
        """
        if seed is None or self.stage.config.dropout == 0.0:
            yield
            return
        devices = [self._device] if self._device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    # ---- input checks: refuse before computing ------------------------------------------

    def check_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return check_inputs(self.stage, x, self.max_tokens, self._device, self._dtype)

    def _check_grad_outputs(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return check_grad_outputs(self.stage, g, x, self._device, self._dtype)

    def _check_targets(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return check_targets(self.stage, y, x, self._device)


# kept importable from here: the loss's ignored target, and what names an accumulated microbatch
__all__ = ["IGNORE_INDEX", "TAKEN_REMEMBERED", "KeptForward", "Microbatch", "ParameterCopy", "StageExecutor",
           "StageStats"]
