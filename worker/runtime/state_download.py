"""Where a new stage's state comes from: a live replica's, or else the newest complete checkpoint.

A worker that builds a stage which already has live replicas (per GetSwarm) downloads one
replica's state once, before it serves or drives (worker.replicas.state_transfer), and starts
from the seed if that fails. It asks those the coordinator says serve their state first
(`WorkerInfo.serves_state`, from their heartbeats), trained ones before the others, and waits
briefly for a trained replica that does not serve yet: one restarting its role. A replica that
does not serve yet is no failure of the download: a joiner that asked it anyway only waited.
Where the coordinator says of none that it serves, the joiner asks as `download_order` says.

A new stage with no live replica to download from resumes from the newest complete checkpoint
instead of the seed (a whole swarm restarting, or the last replica of a stage lost); stage 0
then also resumes its data shard where the checkpoint's left off.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from configs.pretrained import PretrainedCheckpoint
from protos import swarmtrain_pb2 as pb
from worker.pipeline import Replica, StageClient
from worker.pipeline.failover import not_serving_yet
from worker.replicas import StageState, params_digest
from worker.replicas.state_transfer import fetch_served_state
from worker.runtime.checkpoint_format import CheckpointLink, resume
from worker.runtime.data_cursor import DataCursor
from worker.runtime.local_stage import LocalStage
from worker.runtime.policy import download_order, stage_key
from worker.runtime.swarm_view import SwarmView
from worker.runtime.traffic import TrafficMeter
from worker.telemetry.trace import Trace

Log = Callable[[str], None]

DOWNLOAD_TIMEOUT_S = 5.0  # per replica, when a new replica fetches its stage's state
STATE_WAIT_S = 10.0  # how long a new replica waits, in all, for trained ones not serving their state yet


def one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


class StateSource:
    """Fetches our stage's state from its replicas, and resumes it from the coordinator's checkpoints."""

    def __init__(self, client: StageClient, view: SwarmView, run_id: str, checkpoints: CheckpointLink | None,
                 meter: TrafficMeter, log: Log, trace: Trace, pretrained: PretrainedCheckpoint | None = None) -> None:
        self.client, self.view, self.run_id, self.checkpoints = client, view, run_id, checkpoints
        self.meter, self.log, self.trace = meter, log, trace
        self.pretrained = pretrained  # worker --pretrained: the run's starting weights, held locally

    async def fetch(self, local: LocalStage, assignment: pb.Assignment, replica: Replica,
                    wait_until: float = 0.0) -> StageState:
        """`replica`'s state of our stage (its anchor, the anchor's round, its step), each try within
        DOWNLOAD_TIMEOUT_S; asked again until `wait_until` (monotonic) while it does not serve it yet."""
        key = stage_key(self.run_id, assignment.stage_index, assignment.layer_start, assignment.layer_end,
                        assignment.generation)

        def waiting(left: float) -> None:
            self.log(f"stage {assignment.stage_index}: replica {replica.peer_id.to_base58()[-8:]} does not "
                     f"serve its state yet; waiting up to {left:.0f}s")
        return await fetch_served_state(self.client, replica, key, local.module, DOWNLOAD_TIMEOUT_S,
                                        wait_until, waiting)

    async def download(self, local: LocalStage, assignment: pb.Assignment) -> bool:
        """Once per new stage: start from a live replica's parameters and step rather than the seed.
        Returns whether it did."""
        index = assignment.stage_index
        found = await self.view.stage_replicas(index, local.span)
        if not found.replicas:
            return False
        why, waited, deadline = "", 0, time.monotonic() + STATE_WAIT_S
        for replica, wait in download_order(found.replicas, found.trained, found.serving):
            try:
                state = await self.fetch(local, assignment, replica, deadline if wait else 0.0)
            except Exception as err:  # noqa: BLE001 - any failure: try the next replica, then the seed
                peer = replica.peer_id.to_base58()
                if found.serving and peer not in found.serving and not_serving_yet(err):
                    waited += 1  # it said it does not serve yet: no failure of its own
                else:
                    why = one_line(err)
                continue
            local.take_anchor(state)
            local.set_steps(state.step)
            self.meter.state(received=state.wire_bytes)
            peer = replica.peer_id.to_base58()
            self.log(f"stage {index} state downloaded from peer {peer} at step {state.step} "
                     f"({state.wire_bytes:,} bytes)")
            self.trace.write("state", stage=index, outcome="downloaded", peer=peer, step=state.step,
                             bytes=state.wire_bytes)
            return True
        if not why and waited:  # an expected wait at start-up (replicas restarting their roles), no failure
            self.log(f"stage {index}: {waited} replica(s) did not serve their state within {STATE_WAIT_S:.0f}s; "
                     "starting from the newest checkpoint or the seed")
            self.trace.write("state", stage=index, outcome="not_served", waited=waited)
            return False
        self.log(f"stage {index} state download failed ({why})")
        self.trace.write("state", stage=index, outcome="failed", why=why)
        return False

    async def resume(self, local: LocalStage, assignment: pb.Assignment, data: DataCursor) -> bool:
        """A new stage nobody serves yet: start from the newest complete checkpoint, if any."""
        if self.checkpoints is None:
            return False
        index, (start, end) = assignment.stage_index, (assignment.layer_start, assignment.layer_end)
        # the files go to disk as they arrive and are read from there tensor by tensor
        with tempfile.TemporaryDirectory(prefix="swarmtrain-checkpoint-") as folder:
            try:
                files = await self.checkpoints.download(start, end, Path(folder))
                if not files and self.pretrained is not None:
                    return await asyncio.to_thread(self._load_local, local, index)
                if not files:
                    self.log(f"stage {index}: no live replica and no checkpoint yet; starting from the seed")
                    return False
                resumed = await asyncio.to_thread(resume, files, local.module, local.optimizer, local.sync)
            except Exception as err:  # noqa: BLE001 - a mismatch or a failed call: the seed, and say why
                self.log(f"stage {index} cannot resume from the coordinator's checkpoint ({one_line(err)}); "
                         "starting from the seed")
                return False
            size = sum(path.stat().st_size for _, path in files)
        local.set_steps(resumed.step)
        if resumed.data is not None:
            data.at = resumed.data
        self.meter.counters.add_traffic(pb.TRAFFIC_KIND_STATE, received=size)
        if resumed.checkpoint_id == 0:  # the coordinator's checkpoint 0: the pretrained weights
            self.log(f"stage {index} starts from the run's pretrained weights, sent by the coordinator "
                     f"({resumed.files} file(s), {size:,} bytes)")
        else:
            self.log(f"stage {index} resumed from checkpoint {resumed.checkpoint_id} at step {resumed.step} "
                     f"({resumed.files} file(s), {size:,} bytes)")
        self.trace.write("resume", checkpoint=resumed.checkpoint_id, stage=index, step=resumed.step,
                         digest=params_digest(list(local.module.parameters())),
                         **({"data": resumed.data.microbatches} if resumed.data else {}))
        return True

    def _load_local(self, local: LocalStage, index: int) -> bool:
        """The run starts from pretrained weights this worker holds itself: read its stage's."""
        from worker.model.pretrained import load_pretrained

        assert self.pretrained is not None
        started = time.perf_counter()
        read = load_pretrained(local.module, self.pretrained)
        local.sync.reset([p.detach() for p in local.module.parameters()], 0)
        self.log(f"stage {index} starts from the local pretrained copy {self.pretrained.directory} "
                 f"({read / 1e9:.2f} GB read in {time.perf_counter() - started:.1f}s)")
        self.trace.write("resume", checkpoint=0, stage=index, step=0, source="local",
                         digest=params_digest(list(local.module.parameters())))
        return True
