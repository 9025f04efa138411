"""The swarm worker's training runtime: its stage trains in the pipeline the coordinator planned.

`TrainingRuntime` is the `StageRuntime` for an assignment, and only switches roles: the
lifecycle calls start/reassign/stop from a worker thread; the stage is built there (a
`LocalStage`, kept across roles on the same layers) and the rest is handed to the loop. A
re-assignment to the same work (`keeps_role`: a re-plan that moved other workers, new codecs, a
new averaging period, stage 0's new data shard) changes the running role's settings in place;
any other stops the role and starts the new one (worker.runtime.role). A new stage first takes
its state from a live replica, or else from the newest checkpoint (worker.runtime.state_download).

Its collaborators, each with its own state: the one GetSwarm cache (swarm_view), the traffic
meter (traffic), the averaging rounds' pacing (rounds), stage 0's data position and step log
(first_stage), and the checkpoint saver (checkpoints). The worker's P2P daemon is `DataPlane`
(data_plane).
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import torch

from configs.data.errors import DataError
from configs.link import Link
from configs.pretrained import PretrainedCheckpoint
from configs.schema import RunConfig
from protos import swarmtrain_pb2 as pb
from worker.data.shard_cache import ShardSource
from worker.pipeline import StageClient
from worker.pipeline.admission import Admission
from worker.pipeline.pacing import BULK_LINK_SHARE, Pacer
from worker.runtime.checkpoint_format import CheckpointLink
from worker.runtime.checkpoints import CheckpointSaver
from worker.runtime.data_cursor import DataCursor
from worker.runtime.data_plane import DataPlane
from worker.runtime.first_stage import StepLog
from worker.runtime.local_stage import LocalStage
from worker.runtime.policy import keeps_role
from worker.runtime.role import Role, RoleDeps
from worker.runtime.rounds import RoundLinks, RoundPacing
from worker.runtime.settings import outer_settings
from worker.runtime.state_download import DOWNLOAD_TIMEOUT_S, STATE_WAIT_S, StateSource
from worker.runtime.swarm_view import FetchSwarm, SwarmView
from worker.runtime.traffic import TrafficMeter
from worker.telemetry.counters import CounterBook
from worker.telemetry.trace import Trace

__all__ = ["DataPlane", "TrainingRuntime"]

Log = Callable[[str], None]

CALL_TIMEOUT_S = 10.0  # on the loop: starting or stopping a role
CHECKPOINT_LOAD_TIMEOUT_S = 600.0  # a stage's files from the coordinator, when resuming
DOWNLOAD_CALL_S = CALL_TIMEOUT_S + 3 * DOWNLOAD_TIMEOUT_S + STATE_WAIT_S  # a new replica's state download


class TrainingRuntime:
    """A StageRuntime that trains its stage in the pipeline (see the module docstring)."""

    def __init__(self, config: RunConfig, device: torch.device, counters: CounterBook, log: Log, *,
                 plane: DataPlane, loop: asyncio.AbstractEventLoop, run_id: str,
                 fetch_swarm: FetchSwarm, trace: Trace | None = None,
                 checkpoints: CheckpointLink | None = None, lie_scale: float | None = None,
                 withhold_rounds_s: float = 0.0, link: Link | None = None,
                 pretrained: PretrainedCheckpoint | None = None, data_source: ShardSource | None = None) -> None:
        self.config, self.device, self.counters, self.log = config, device, counters, log
        self.trace = trace or Trace()
        self.plane, self.loop, self.run_id = plane, loop, run_id
        self.lie_scale = lie_scale  # worker --lie-scale: resilience tests only
        self.view = SwarmView(fetch_swarm, plane.peer_id)
        self.admission = Admission(self.view.admitted)
        self.meter = TrafficMeter(counters)
        self.data = DataCursor(config, counters.data_leases, data_source, log)
        client = StageClient(plane.p2p)  # state downloads and averaging rounds, across roles
        states = StateSource(client, self.view, run_id, checkpoints, self.meter, log, self.trace, pretrained)
        # averaging rounds' bulk goes out at a share of our link, so activations pass between it
        up = link.upload_bytes_per_s if link is not None and link.upload_bytes_per_s > 0 else None
        links = RoundLinks(up, Pacer(up * BULK_LINK_SHARE) if up else None)
        self.deps = RoleDeps(config=config, plane=plane, run_id=run_id, view=self.view,
                             admission=self.admission, client=client, states=states, counters=counters,
                             meter=self.meter, trace=self.trace, log=log, data=self.data,
                             step_log=StepLog(log, config.worker.log_interval_s, config.training.seq_len),
                             pacing=RoundPacing(), links=links, watched=self._watched,
                             withhold_rounds_s=withhold_rounds_s)
        self.saver = CheckpointSaver(checkpoints, lambda: self._role, self.data, self.meter, log, self.trace)
        self.stage: LocalStage | None = None  # kept across roles on the same layers
        self._role: Role | None = None
        self._on_failure: Callable[[BaseException], None] | None = None  # the lifecycle's, see watch

    # ---- the StageRuntime calls (from a worker thread) ----------------------------------

    def start(self, assignment: pb.Assignment) -> None:
        self._apply(assignment)

    def reassign(self, assignment: pb.Assignment) -> None:
        self._apply(assignment)

    def stop(self) -> None:
        self._on_loop(self._stop_role())
        self.stage = None

    def watch(self, on_failure: Callable[[BaseException], None]) -> None:
        self._on_failure = on_failure

    def request_checkpoint(self, request: pb.CheckpointRequest) -> None:
        """The coordinator asked for our stage's part of a checkpoint (on the loop)."""
        self.saver.request(request)

    # ---- switching roles -------------------------------------------------------------------

    def _apply(self, assignment: pb.Assignment) -> None:
        role = self._role
        if role is not None and keeps_role(role.assignment, assignment):
            self._on_loop(role.adjust(assignment))
            return
        self._on_loop(self._stop_role())
        span = (assignment.layer_start, assignment.layer_end)
        self.trace.write("assign", stage=assignment.stage_index, layers=list(span),
                         plan_version=assignment.plan_version)
        training = self.config.training
        rolled_back = self.stage is not None and self.stage.generation != assignment.generation
        fresh = self.stage is None or self.stage.span != span or rolled_back
        if rolled_back:
            self.log(f"the swarm went back as a whole (generation {assignment.generation}): stage "
                     f"{assignment.stage_index} is rebuilt from the newest checkpoint, or the seed if there is none")
            self.trace.write("rollback", stage=assignment.stage_index, generation=assignment.generation)
        if fresh:
            stage = self.stage = LocalStage.build(self.config, span, self.device, self.counters,
                                                  outer_settings(assignment, training), self.lie_scale,
                                                  assignment.generation)
            self.log(f"stage {assignment.stage_index} ready: {stage.parameters:,} parameters on "
                     f"{self.device.type} in {stage.build_s:.1f}s")
            self.trace.write("ready", stage=assignment.stage_index, parameters=stage.parameters,
                             device=self.device.type, seconds=round(stage.build_s, 3))
        else:
            assert self.stage is not None
            stage = self.stage
            stage.sync.configure(outer_settings(assignment, training))
        if assignment.stage_index == 0:
            self.data.prepare()
        self.view.invalidate()  # a new plan may list other replicas
        states = self.deps.states
        if fresh and not self._on_loop(states.download(stage, assignment), DOWNLOAD_CALL_S):
            resumed = self._on_loop(states.resume(stage, assignment, self.data), CHECKPOINT_LOAD_TIMEOUT_S)
            if rolled_back and not resumed:
                self.data.at = None  # back to the seed: the data from its beginning too
        self._on_loop(self._start_role(stage, assignment))

    async def _start_role(self, stage: LocalStage, assignment: pb.Assignment) -> None:
        role = Role(self.deps, stage, assignment)
        try:
            await role.start()
        except BaseException:
            await role.shutdown()  # what it started so far
            raise
        self._role = role

    async def _stop_role(self) -> None:
        role, self._role = self._role, None
        if role is not None:
            await role.shutdown()

    def _on_loop(self, coro: Awaitable[Any], timeout: float = CALL_TIMEOUT_S) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def _watched(self, task: asyncio.Task[Any]) -> None:
        """`task` is reported to the lifecycle if it dies of an error: a driver or server that
        stopped must not leave a worker that heartbeats as if it trained."""
        def done(task: asyncio.Task[Any]) -> None:
            err = None if task.cancelled() else task.exception()
            if err is None:
                return
            if not isinstance(err, DataError):  # bad data is a user's problem: its one line says it all
                self.log("".join(traceback.format_exception(err)).rstrip())
            if self._on_failure is not None:
                self._on_failure(err)
        task.add_done_callback(done)

