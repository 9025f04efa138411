"""The first stage's side of pipeline training: drive each microbatch through the stages and back.

For one microbatch: forward through the driver's own stage (embedding + first blocks,
keeping its graph), `forward` on each middle stage in turn, `forward_backward` on the last
stage with the targets, then `backward` on the middle stages in reverse order (each
recomputes its forward from the inputs it is sent again), and finally the local backward.
Every remote call goes to one replica of its stage, chosen by `ReplicaPicker`, and moves to
another replica if that one dies or times out: remote stages are stateless between calls,
so a microbatch survives the loss of any replica that is not the last of its stage.

Up to `max_in_flight` microbatches run at once, so while one waits on stage 2 another
computes on stage 1. By default `train_step` drains all microbatches of a step before the
next step starts: every stage then steps on exactly the step's microbatches, which is what
makes a pipeline run match local training. The drain costs a bubble per step, and on a thin
link its worst part is the transfer time of the first microbatch's activations and of the
last one's gradients, during which the other stages wait. With `overlap_steps`, a step that
is told its successor's microbatches (`upcoming`) sends them on while its own finish: their
forwards run on a copy of the driver's parameters from before this step's optimizer step,
and their gradients, taken at that copy, count towards the next step (the first stage's
gradients are one step stale, as when SWARM lets steps overlap).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from hivemind.p2p import PeerID

from configs.memory import MICROBATCHES_IN_FLIGHT
from worker.model.gptj import param_seed
from worker.model.stage import StageModule
from worker.pipeline.attempts import StepTag
from worker.pipeline.errors import BadResponse, PipelineError
from worker.pipeline.executor import KeptForward, ParameterCopy, StageExecutor
from worker.pipeline.failover import ReplicaPicker, call_with_failover
from worker.pipeline.route import Replica, Route, StageRoute
from worker.pipeline.stage_client import DEFAULT_TIMEOUT_S, StageClient
from worker.pipeline.wire import WireCodec, check_codec

__all__ = ["DriverStats", "PipelineDriver", "Replica", "Route", "StageRoute", "StepReport"]

T = TypeVar("T")
Batch = tuple[torch.Tensor, torch.Tensor]
_MAX_FAILURE_NOTES = 32


@dataclass
class DriverStats:
    microbatches: int = 0  # completed end to end
    samples: int = 0
    steps: int = 0
    retries: int = 0  # remote calls that failed on one replica and were sent to another
    asked_again: int = 0  # remote calls sent again to the same replica after it closed the stream unanswered
    failed_microbatches: int = 0  # gave up on: no replica left, or the request was refused
    failures: list[str] = field(default_factory=list)  # the latest few, for logs


@dataclass
class _Ahead:
    """One of the next step's microbatches, sent on before that step began (`overlap_steps`)."""

    batch: Batch
    tag: StepTag
    task: asyncio.Task[tuple[float, KeptForward, torch.Tensor]]  # loss, local graph, its gradient


@dataclass(frozen=True)
class StepReport:
    step: int  # 1-based count of optimizer steps taken by the driver's stage
    loss: float  # sample-weighted mean of the microbatch losses
    samples: int
    seconds: float
    retries: int  # during this step


class PipelineDriver:
    """Trains the pipeline from its first stage: `stage` lives here, `route` says where the rest are."""

    def __init__(
        self,
        client: StageClient,
        stage: StageModule,
        optimizer: torch.optim.Optimizer,
        route: Route,
        *,
        batch_size: int,
        codec: WireCodec = "none",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_in_flight: int = MICROBATCHES_IN_FLIGHT,  # configs.memory counts their activations
        grad_clip: float | None = None,
        lr_at: Callable[[int], float] | None = None,
        picker: ReplicaPicker | None = None,
        seed: int = 0,
        overlap_steps: bool = False,
        precision: str = "fp32",
    ) -> None:
        if not stage.is_first:
            raise ValueError("the driver holds the first stage (the one with the embedding)")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1 (got {max_in_flight})")
        self.client = client
        self.stage = stage
        self.local = StageExecutor(stage, optimizer, batch_size, grad_clip=grad_clip, lr_at=lr_at,
                                   precision=precision)
        self.batch_size = batch_size
        self.codec = check_codec(codec)
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self.picker = picker or ReplicaPicker()
        self.seed = seed
        self.overlap_steps = overlap_steps
        self.stats = DriverStats()
        self._ahead: list[_Ahead] = []
        self._microbatch_index = 0
        self._session = secrets.randbits(62)  # tells the stages our attempts from a past driver's
        self._attempt = 0
        self.set_route(route)

    def set_route(self, route: Route) -> None:
        """Use `route` for the calls that start from now on (calls in flight keep their replica)."""
        if self.stage.is_last != (not route.stages):
            raise ValueError("the route must list every stage after the driver's own, and only those")
        for stage_route in route.stages:
            for replica in stage_route.replicas:
                self.client.add_addresses(replica.peer_id, replica.maddrs)
        self.route = route

    # ---- training ----------------------------------------------------------------------

    async def train_step(self, microbatches: Sequence[Batch], upcoming: Sequence[Batch] = ()) -> StepReport:
        """Run one optimizer step's microbatches (their sizes must sum to `batch_size`), then step.

        Every stage steps when its accumulated samples reach the batch size, so the step is
        complete when the last microbatch's local backward returns. If a microbatch fails,
        the error is raised after the others settle, and the local gradients are dropped;
        calls to remote stages carry the step and attempt (`StepTag`), so when the step is
        tried again the remote stages drop what this attempt left there.

        upcoming: the next step's first microbatches; with `overlap_steps` they are sent on
        during this step, and the next call, given them first again (the same tensors),
        finishes them.
        """
        samples = sum(int(x.size(0)) for x, _ in microbatches)
        if samples != self.batch_size:
            raise ValueError(f"a step takes {self.batch_size} samples; these microbatches hold {samples}")
        started = time.perf_counter()
        retries_before, steps_before = self.stats.retries, self.local.stats.steps
        gate = asyncio.Semaphore(self.max_in_flight)
        ahead = await self._take_ahead(microbatches)
        if not ahead:
            self._attempt += 1
        tag = StepTag(self._session, steps_before + 1, self._attempt)

        async def one(inputs: torch.Tensor, targets: torch.Tensor) -> float:
            async with gate:
                return await self.run_microbatch(inputs, targets, tag)

        async with self.local.step():  # no averaging round replaces our parameters mid-step
            runs = [self._finish_ahead(a) for a in ahead] + [one(x, y) for x, y in microbatches[len(ahead):]]
            gathered = asyncio.gather(*runs, return_exceptions=True)
            if upcoming and self.overlap_steps and not self.stage.is_last:
                # created after this step's microbatches: their forwards queue behind ours
                self._start_ahead(upcoming, steps_before + 2)
            results = await gathered
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.drop_ahead()  # sent on the failed step's parameters; the retry resends them
            self.local.zero_grad()
            failed = f"{len(errors)} of {len(microbatches)} microbatches failed"
            raise PipelineError(f"step {steps_before + 1}: {failed}: {errors[0]}") from errors[0]
        if self.local.stats.steps != steps_before + 1:
            raise PipelineError(f"step {steps_before + 1}: the local stage did not step")  # a bug if seen
        self.stats.steps += 1
        weighted = zip(results, microbatches, strict=True)
        return StepReport(
            step=self.local.stats.steps,
            loss=sum(float(loss) * int(x.size(0)) for loss, (x, _) in weighted) / samples,
            samples=samples,
            seconds=time.perf_counter() - started,
            retries=self.stats.retries - retries_before,
        )

    async def train(
        self, batches: Iterator[Batch], steps: int, microbatches_per_step: int
    ) -> list[StepReport]:
        """`steps` optimizer steps, each over the next `microbatches_per_step` batches of `batches`."""
        reports: list[StepReport] = []
        following = [next(batches) for _ in range(microbatches_per_step)] if steps > 0 else []
        for i in range(steps):
            current = following
            following = [next(batches) for _ in range(microbatches_per_step)] if i + 1 < steps else []
            reports.append(await self.train_step(current, following))
        return reports

    @property
    def sent_ahead(self) -> int:
        """Microbatches of the next step sent on early (`overlap_steps`) and not yet finished."""
        return len(self._ahead)

    async def drop_ahead(self) -> None:
        """Cancel the microbatches sent on early, if any (the driver is done, or their step failed)."""
        ahead, self._ahead = self._ahead, []
        for a in ahead:
            a.task.cancel()
        await asyncio.gather(*(a.task for a in ahead), return_exceptions=True)

    def _start_ahead(self, batches: Sequence[Batch], step: int) -> None:
        tag = StepTag(self._session, step, self._attempt + 1)
        # one copy for all of them: this step's optimizer step will change the parameters before
        # their backward
        copy = ParameterCopy()

        async def run(inputs: torch.Tensor, targets: torch.Tensor, index: int) -> tuple[float, KeptForward, torch.Tensor]:
            hidden, kept = await self.local.forward_keep(inputs, on=copy)
            loss, grad = await self._remote(index, hidden, targets, tag)
            return loss, kept, grad

        # no more than a step keeps in flight: their activations stay until this step ends, on
        # top of its own (configs/memory.py counts both), and a large batch must not send all
        for inputs, targets in batches[: self.max_in_flight]:
            index = self._microbatch_index
            self._microbatch_index += 1
            self._ahead.append(_Ahead((inputs, targets), tag, asyncio.create_task(run(inputs, targets, index))))

    async def _take_ahead(self, microbatches: Sequence[Batch]) -> list[_Ahead]:
        """The microbatches sent on early, if they are the first of `microbatches` (the same
        tensors); else they are dropped."""
        ahead = self._ahead
        if ahead and len(ahead) <= len(microbatches) and all(
                a.batch[0] is x and a.batch[1] is y for a, (x, y) in zip(ahead, microbatches)):
            self._ahead = []
            self._attempt = ahead[0].tag.attempt
            return ahead
        await self.drop_ahead()
        return []

    async def _finish_ahead(self, ahead: _Ahead) -> float:
        """Its local backward, inside the step it belongs to."""
        async def finish() -> float:
            loss, kept, grad = await ahead.task
            await self.local.backward_kept(kept, grad)
            return loss

        return await self._counted("microbatch sent on early", int(ahead.batch[0].size(0)), finish())

    async def run_microbatch(
        self, inputs: torch.Tensor, targets: torch.Tensor, tag: StepTag | None = None
    ) -> float:
        """Forward and backward of one microbatch through the whole pipeline; its mean loss.

        Gradients accumulate on every stage (scaled for a step of `batch_size` samples).
        """
        index = self._microbatch_index
        self._microbatch_index += 1
        work = self._run_microbatch(index, inputs, targets, tag)
        return await self._counted(f"microbatch {index}", int(inputs.size(0)), work)

    async def _counted(self, what: str, samples: int, work: Awaitable[float]) -> float:
        try:
            loss = await work
        except BaseException as err:
            self.stats.failed_microbatches += 1
            self._note(f"{what}: {type(err).__name__}: {err}")
            raise
        self.stats.microbatches += 1
        self.stats.samples += samples
        return loss

    async def _run_microbatch(
        self, index: int, inputs: torch.Tensor, targets: torch.Tensor, tag: StepTag | None
    ) -> float:
        if self.stage.is_last:  # a one-stage pipeline: nothing is remote
            loss, _ = await self.local.forward_backward(inputs, targets)
            return loss
        hidden, kept = await self.local.forward_keep(inputs)
        loss, grad = await self._remote(index, hidden, targets, tag)
        await self.local.backward_kept(kept, grad)
        return loss

    async def _remote(
        self, index: int, hidden: torch.Tensor, targets: torch.Tensor, tag: StepTag | None
    ) -> tuple[float, torch.Tensor]:
        """The stages after ours: forward through each, backward from the last; (loss, our outputs' grad)."""
        route, batch = self.route, int(hidden.size(0))
        stage_inputs: list[torch.Tensor] = []  # what each middle stage was given
        for stage in route.middle:
            stage_inputs.append(hidden)
            hidden = await self._on_replica(stage, batch, "forward", self._forward_call(stage, hidden, index))
        loss, grad = await self._on_replica(
            route.last,
            batch,
            "forward_backward",
            self._forward_backward_call(route.last, hidden, targets, index, tag),
        )
        for stage, x in zip(reversed(route.middle), reversed(stage_inputs), strict=True):
            grad = await self._on_replica(
                stage, batch, "backward", self._backward_call(stage, x, grad, index, tag)
            )
        return loss, grad

    # ---- remote calls ------------------------------------------------------------------

    def _forward_call(
        self, stage: StageRoute, x: torch.Tensor, index: int
    ) -> Callable[[PeerID], Awaitable[torch.Tensor]]:
        async def call(peer: PeerID) -> torch.Tensor:
            out = await self.client.forward(
                peer, stage.key, x, self.codec, self.timeout_s, seed=self._seed(index, stage)
            )
            self._expect_hidden(out, x, stage, "forward")
            return out

        return call

    def _backward_call(
        self, stage: StageRoute, x: torch.Tensor, grad: torch.Tensor, index: int, tag: StepTag | None
    ) -> Callable[[PeerID], Awaitable[torch.Tensor]]:
        async def call(peer: PeerID) -> torch.Tensor:
            seed = self._seed(index, stage)
            grad_inputs = await self.client.backward(
                peer, stage.key, x, grad, self.codec, self.timeout_s, seed=seed, tag=tag
            )
            assert (
                grad_inputs is not None
            )  # hidden-state inputs always have a gradient (checked by the client)
            return grad_inputs

        return call

    def _forward_backward_call(
        self, stage: StageRoute, x: torch.Tensor, targets: torch.Tensor, index: int, tag: StepTag | None
    ) -> Callable[[PeerID], Awaitable[tuple[float, torch.Tensor]]]:
        async def call(peer: PeerID) -> tuple[float, torch.Tensor]:
            seed = self._seed(index, stage)
            loss, grad = await self.client.forward_backward(
                peer, stage.key, x, targets, self.codec, self.timeout_s, seed=seed, tag=tag
            )
            assert grad is not None
            return loss, grad

        return call

    async def _on_replica(
        self, stage: StageRoute, batch: int, method: str, call: Callable[[PeerID], Awaitable[T]]
    ) -> T:
        def failed(peer: PeerID, err: BaseException) -> None:
            self.stats.retries += 1
            self._note(
                f"stage {stage.index} {method} on …{peer.to_base58()[-8:]}: {type(err).__name__}: {err}"
            )

        def ask_again(peer: PeerID, err: BaseException) -> None:
            self.stats.asked_again += 1
            self._note(f"stage {stage.index} {method} on …{peer.to_base58()[-8:]}: {err}; asking it again")

        return await call_with_failover(
            stage.peer_ids,
            call,
            picker=self.picker,
            samples=batch,
            what=f"stage {stage.index} ({stage.key}) {method}",
            on_failure=failed,
            on_ask_again=ask_again,
        )

    def _expect_hidden(self, out: torch.Tensor, x: torch.Tensor, stage: StageRoute, method: str) -> None:
        if out.shape != x.shape or not out.is_floating_point():
            raise BadResponse(
                f"stage {stage.index} {method} returned {out.dtype} {tuple(out.shape)} for {tuple(x.shape)}"
            )

    def _seed(self, index: int, stage: StageRoute) -> int:
        """The dropout seed of this microbatch on this stage: its forward and recomputation draw alike."""
        return param_seed(self.seed, f"microbatch {index} stage {stage.index}")

    def _note(self, message: str) -> None:
        self.stats.failures.append(message[:300])
        del self.stats.failures[:-_MAX_FAILURE_NOTES]
