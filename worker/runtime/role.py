"""What runs for one assignment: one container that owns every resource of the role, with one shutdown.

Every stage, the first too, serves its parameters and local step under
`swarmtrain.pipeline.{key}.state` (a `StateServer`; the heartbeats say so from its start to the
role's end, `CounterBook.set_serves_state`) and takes part in its replicas' averaging rounds
(a `RoundScheduler`). Stage 0 then drives the pipeline (a `FirstStage`); every other stage
serves itself (a `ServedStage`) under `{run_id}.stage{index}.{layer_start}-{layer_end}`.

All of it runs on the worker's event loop, beside the heartbeats; the stage's compute runs in
its executor's threads, so the loop stays free.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from configs.schema import RunConfig
from protos import swarmtrain_pb2 as pb
from worker.pipeline import StageClient, StageExecutor
from worker.pipeline.admission import Admission
from worker.replicas import StateServer
from worker.runtime.data_cursor import DataCursor
from worker.runtime.data_plane import DataPlane
from worker.runtime.first_stage import FirstStage, StepLog
from worker.runtime.local_stage import LocalStage
from worker.runtime.policy import stage_key
from worker.runtime.rounds import RoundLinks, RoundPacing, RoundScheduler
from worker.runtime.served_stage import ServedStage
from worker.runtime.settings import codec_name, outer_settings
from worker.runtime.state_download import StateSource
from worker.runtime.swarm_view import SwarmView
from worker.runtime.traffic import TrafficMeter
from worker.telemetry.counters import CounterBook
from worker.telemetry.trace import Trace

Log = Callable[[str], None]

STOP_WAIT_S = 10.0  # for a stopped role's last compute to finish


@dataclass(frozen=True)
class RoleDeps:
    """What every role of this worker is built with: the worker's own, shared across its roles."""

    config: RunConfig
    plane: DataPlane
    run_id: str
    view: SwarmView
    admission: Admission
    client: StageClient  # state downloads and averaging rounds
    states: StateSource
    counters: CounterBook
    meter: TrafficMeter
    trace: Trace
    log: Log
    data: DataCursor
    step_log: StepLog
    pacing: RoundPacing
    links: RoundLinks
    watched: Callable[[asyncio.Task[Any]], None]  # the lifecycle hears of a task that died of an error
    withhold_rounds_s: float = 0.0  # worker --withhold-rounds: resilience tests only


class Role:
    """The role for `assignment` on `local`; `start`, `adjust` and `shutdown` run on the loop."""

    def __init__(self, deps: RoleDeps, local: LocalStage, assignment: pb.Assignment) -> None:
        self.deps, self.local, self.assignment = deps, local, assignment
        self.index = assignment.stage_index
        self.key = stage_key(deps.run_id, self.index, assignment.layer_start, assignment.layer_end,
                             assignment.generation)
        self.work: FirstStage | ServedStage | None = None
        self.state: StateServer | None = None
        self.rounds: RoundScheduler | None = None
        self.tasks: list[asyncio.Task[Any]] = []

    def executor(self) -> StageExecutor | None:
        """What computes on the stage now, if anything (stage 0: once its driver has a route)."""
        return self.work.executor if self.work is not None else None

    def live_step(self) -> int:
        return self.work.live_step() if self.work is not None else self.local.steps

    async def start(self) -> None:
        deps, local = self.deps, self.local
        p2p = deps.plane.p2p
        self.state = StateServer(p2p, self.key, local.module, self.executor, lambda: local.steps,
                                 sync=lambda: local.sync)
        await self.state.start()
        deps.counters.set_serves_state(True)
        self.rounds = RoundScheduler(local, self.assignment, p2p=p2p, run_id=deps.run_id, client=deps.client,
                                     view=deps.view, states=deps.states, admission=deps.admission,
                                     counters=deps.counters, meter=deps.meter, trace=deps.trace, log=deps.log,
                                     pacing=deps.pacing, links=deps.links, executor=self.executor,
                                     takeover_floor_s=deps.config.training.leader_takeover_s,
                                     withhold_s=deps.withhold_rounds_s)
        await self.rounds.start()
        if self.index == 0:
            self.work = FirstStage(deps.config, local, self.assignment, client=StageClient(p2p),
                                   view=deps.view, run_id=deps.run_id, data=deps.data, counters=deps.counters,
                                   meter=deps.meter, trace=deps.trace, log=deps.log, step_log=deps.step_log,
                                   after_step=self._report_state)
            self._run(self.work.run(), self.rounds.run())
            shard, shards = self.assignment.data_shard_index, max(1, self.assignment.data_shard_count)
            codec = codec_name(self.assignment.activation_compression)
            deps.log(f"stage 0 drives the pipeline · data shard {shard}/{shards} · activations {codec}")
            deps.trace.write("driving", stage=0, shard=shard, shards=shards, codec=codec)
            return
        served = self.work = ServedStage(deps.config, local, self.key, p2p=p2p, admission=deps.admission,
                                         counters=deps.counters, meter=deps.meter,
                                         after_report=self._report_state)
        await served.start()
        self._run(served.run(), self.rounds.run())
        deps.log(f"stage {self.index} serving {self.key} on peer {deps.plane.peer_id}")
        deps.trace.write("serving", stage=self.index, key=self.key, peer_id=deps.plane.peer_id)

    async def adjust(self, assignment: pb.Assignment) -> None:
        """The role takes `assignment`'s settings (keeps_role): on the loop, between two of its
        coroutines' steps; a round or microbatch in flight finishes with the old ones."""
        deps = self.deps
        self.assignment = assignment
        deps.trace.write("assign", stage=assignment.stage_index, layers=list(self.local.span),
                         plan_version=assignment.plan_version, in_place=True)
        self.local.sync.configure(outer_settings(assignment, deps.config.training))
        if self.rounds is not None:
            self.rounds.adjust(assignment)
        deps.view.invalidate()  # a new plan may list other replicas
        if isinstance(self.work, FirstStage):
            self.work.adjust(assignment)
        # the lifecycle's `assigned:` line just before this one names the new settings
        deps.log(f"stage {assignment.stage_index} goes on with its new assignment (no restart)")

    async def shutdown(self) -> None:
        """Stop serving (and say so first), stop the role's coroutines, let the last compute finish
        and report what the role did since its last report."""
        self.deps.counters.set_serves_state(False)
        executor = self.executor()
        if isinstance(self.work, ServedStage):
            await self.work.stop()
        if self.state is not None:
            await self.state.stop()
        if self.rounds is not None:
            await self.rounds.stop()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if isinstance(self.work, FirstStage):
            self.work.driver = None
        if executor is not None:
            # a cancelled call's compute (a backward, an optimizer step) finishes in its thread:
            # let it, before the next role computes on the same parameters
            with contextlib.suppress(Exception):
                await asyncio.wait_for(executor.exclusive(lambda: None), STOP_WAIT_S)
        if isinstance(self.work, ServedStage):
            self.work.flush()
        self._report_state()
        self.deps.meter.forget(*self._sources())
        self.work = None

    def _run(self, *coros: Any) -> None:
        for coro in coros:
            task = asyncio.create_task(coro)
            self.deps.watched(task)
            self.tasks.append(task)

    def _sources(self) -> list[object]:
        """What the traffic meter counts of this role."""
        work = self.work
        traffic = work.server.traffic if isinstance(work, ServedStage) else \
            work.client.traffic if isinstance(work, FirstStage) else None
        follower = self.rounds.follower if self.rounds is not None else None
        return [s for s in (self.state, follower, traffic) if s is not None]

    def _report_state(self) -> None:
        """The state server's and the round follower's bytes since they were last reported."""
        if self.state is not None:
            self.deps.meter.state_server(self.state)
        if self.rounds is not None:
            self.deps.meter.follower(self.rounds.follower)
