"""Stage 0's work: it reads batches from its data shard and drives each step's microbatches through
the pipeline (a `PipelineDriver`).

The route is the replicas GetSwarm lists for stages 1..n-1 (worker.runtime.swarm_view), read
again every ROUTE_REFRESH_S and after a failed step; stage 0 trains only once every stage has a
replica. A failed step is retried on the same microbatches: a lost peer costs time, never data.
A re-plan may move stage 0 to another data shard (keeps_role): it moves between two steps and
goes on where its position in the data says (`DataCursor`).

The driver learns the last stage's losses from its `forward_backward` replies and logs them, but
does not report them, or they would count twice: the last stage reports them (a one-stage
pipeline's driver is the last stage and does report).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import torch

from configs.schema import RunConfig
from protos import swarmtrain_pb2 as pb
from worker.pipeline import PipelineDriver, PipelineError, Route, StageClient, StageExecutor
from worker.runtime.data_cursor import DataCursor
from worker.runtime.local_stage import LocalStage
from worker.runtime.settings import activation_choice
from worker.runtime.swarm_view import ROUTE_REFRESH_S, SwarmView
from worker.runtime.traffic import TrafficMeter
from worker.telemetry.counters import CounterBook
from worker.telemetry.trace import Trace

Log = Callable[[str], None]
Batch = tuple[torch.Tensor, torch.Tensor]

ROUTE_WAIT_S = 0.5  # between looks while a stage has no replica yet
RETRY_BACKOFF_S = (0.5, 5.0)  # after a failed step: first and longest pause
GRANT_WAIT_S = 0.1  # between looks while the token budget's grant (or the handed-out data) is used up
WAITING_FOR = {"budget": "stage 0: the token budget handed to this worker is used up; waiting for the coordinator",
               "data": "stage 0: waiting for the coordinator to hand out data",
               "shards": "stage 0: fetching the data shards its ranges need"}


class StepLog:
    """The `step N · loss · tok/s` line, at most every `interval_s`."""

    def __init__(self, log: Log, interval_s: float, seq_len: int) -> None:
        self.log, self.interval_s, self.seq_len = log, interval_s, seq_len
        self._last: float | None = None

    def step(self, steps: int, report: Any) -> None:
        now = time.monotonic()
        if self._last is None or now - self._last >= self.interval_s:
            self._last = now
            rate = report.samples * self.seq_len / max(report.seconds, 1e-9)
            self.log(f"step {steps} · loss {report.loss:.3f} · {rate:,.0f} tok/s")


class FirstStage:
    """Stage 0 driving the pipeline for one role; `assignment` takes in-place changes (`adjust`)."""

    def __init__(self, config: RunConfig, local: LocalStage, assignment: pb.Assignment, *,
                 client: StageClient, view: SwarmView, run_id: str, data: DataCursor, counters: CounterBook, meter: TrafficMeter,
                 trace: Trace, log: Log, step_log: StepLog, after_step: Callable[[], None]) -> None:
        self.config, self.local, self.assignment, self.client = config, local, assignment, client
        self.view, self.run_id, self.data, self.counters, self.meter = view, run_id, data, counters, meter
        self.trace, self.log, self.step_log, self.after_step = trace, log, step_log, after_step
        self.driver: PipelineDriver | None = None
        self._counted = 0  # the driver's steps already added to the stage's

    @property
    def executor(self) -> StageExecutor | None:
        return self.driver.local if self.driver is not None else None

    def live_step(self) -> int:
        """Optimizer steps of the stage up to now, counting those not yet added to its count."""
        if self.driver is not None:
            return self.local.steps + self.driver.local.stats.steps - self._counted
        return self.local.steps

    def adjust(self, assignment: pb.Assignment) -> None:
        """New settings in place: the shard moves between two steps; sent-ahead microbatches still finish."""
        self.assignment = assignment
        if self.driver is not None:
            self.driver.codec = activation_choice(assignment.activation_compression)
            self.driver.overlap_steps = assignment.overlap_steps

    async def run(self) -> None:
        training = self.config.training
        per_step = max(1, training.batch_size // training.micro_batch_size)
        shard, shards = self.assignment.data_shard_index, max(1, self.assignment.data_shard_count)
        self.data.open(shard, shards)
        route: Route | None = None
        refreshed, stale = float("-inf"), False
        backoff = RETRY_BACKOFF_S[0]
        waiting_said = budget_said = data_said = False
        pending: list[Batch] = []
        following: list[Batch] = []  # read ahead when steps overlap
        try:
            while True:
                settings = self.assignment
                moved = (settings.data_shard_index, max(1, settings.data_shard_count))
                if moved != (shard, shards) and not pending and self.data.leases is None:
                    # a re-plan split the data anew: between steps
                    if self.driver is not None:
                        await self.driver.drop_ahead()  # read from the old shard; not trained, so not counted
                    following = []
                    shard, shards = moved
                    self.data.open(shard, shards)
                    self.log(f"stage 0 reads data shard {shard}/{shards} from microbatch "
                             f"{self.data.at.microbatches if self.data.at else 0} on")
                if route is None or stale or time.monotonic() - refreshed > ROUTE_REFRESH_S:
                    found, why = await self.view.route(self.run_id, self.assignment.num_stages, self.local.span,
                                                       route, max_age=0.0, generation=self.assignment.generation)
                    refreshed, stale = time.monotonic(), False
                    if found is None:
                        if not waiting_said:
                            self.log(f"stage 0 waiting for the pipeline: {why}")
                            self.trace.write("pipeline", complete=False, why=why)
                            waiting_said = True
                        route = None
                        await asyncio.sleep(ROUTE_WAIT_S)
                        continue
                    if found != route:
                        self._take_route(found)
                        if route is None:
                            self._complete(found)
                        route, waiting_said = found, False
                driver = self.driver
                assert driver is not None and route is not None
                compute_before = driver.local.stats.compute_s
                if not pending and not self.counters.may_drive(training.tokens_per_step):
                    budget_said = await self._wait_for("budget", budget_said)
                    continue
                # a failed step is retried on the same microbatches: a lost peer costs time, never data
                if not pending:
                    step = following or self.data.next_step(per_step)
                    if step is None:  # the coordinator has handed no data out yet (or none is left)
                        data_said = await self._wait_for(self.data.waiting_on, data_said)
                        continue
                    pending, following, data_said = step, [], False
                if driver.overlap_steps and not following:
                    following = self.data.next_step(per_step) or []
                try:
                    report = await driver.train_step(pending, following)
                except PipelineError as err:
                    error = str(err).splitlines()[0][:300] if str(err) else ""
                    self.log(f"step failed: {error}; re-reading the route")
                    self.trace.write("step_failed", error=error)
                    stale = True
                    await asyncio.sleep(backoff)
                    backoff = min(RETRY_BACKOFF_S[1], backoff * 2)
                    continue
                finally:
                    self.local.add_steps(driver.local.stats.steps - self._counted)
                    self._counted = driver.local.stats.steps
                    self.meter.pipeline(self.client.traffic)
                backoff = RETRY_BACKOFF_S[0]
                self.data.trained(len(pending))
                pending = []
                self._count(report, driver.local.stats.compute_s - compute_before, per_step)
        finally:
            if self.driver is not None:  # no microbatch sent on early outlives the drive
                await self.driver.drop_ahead()
            self.data.give_back()  # read ahead, not trained: handed-out data goes back to its ranges

    async def _wait_for(self, handout: str, said: bool) -> bool:
        """Wait for the coordinator's next handout, "budget" (a grant of the token budget) or "data"
        (ranges of prepared data), or for the run to complete. Says so once per wait; True while waiting."""
        if not said:
            self.log(WAITING_FOR[handout])
            self.trace.write(handout, waiting=True)
        await asyncio.sleep(GRANT_WAIT_S)
        return True

    def _take_route(self, route: Route) -> None:
        if self.driver is None:
            # read now: an in-place change may have come while the route was read
            training, settings = self.config.training, self.assignment
            self.driver = PipelineDriver(
                self.client, self.local.module, self.local.optimizer, route, batch_size=training.batch_size,
                codec=activation_choice(settings.activation_compression), grad_clip=training.grad_clip,
                lr_at=self.local.lr_at(training), seed=training.seed, overlap_steps=settings.overlap_steps,
                max_in_flight=training.microbatches_in_flight, precision=training.precision)
            self._counted = 0
        else:
            self.driver.set_route(route)

    def _complete(self, route: Route) -> None:
        counts = ", ".join(f"stage {s.index}: {len(s.replicas)} replica(s)" for s in route.stages)
        self.log(f"pipeline complete ({counts or 'a single stage'}): training")
        self.trace.write("pipeline", complete=True, replicas={str(s.index): len(s.replicas) for s in route.stages})

    def _count(self, report: Any, computed: float, per_step: int) -> None:
        """A step's work, loss (a one-stage pipeline computes it here), log line and trace event."""
        seq_len = self.config.training.seq_len
        self.counters.add_work(tokens=report.samples * seq_len, samples=report.samples,
                               compute_s=computed, wait_s=max(0.0, report.seconds - computed))
        if self.local.module.is_last:
            self.counters.add_loss(report.loss * per_step, per_step)
        self.step_log.step(self.local.steps, report)
        self.trace.write("step", stage=0, step=self.local.steps, loss=report.loss, samples=report.samples,
                         seconds=round(report.seconds, 4), retries=report.retries)
        self.after_step()
