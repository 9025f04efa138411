"""Saving our stage's part of a checkpoint when a heartbeat reply asks for it.

The stage is copied between two optimizer steps (under its executor's lock), packed off the
lock (worker.runtime.checkpoint_format) and uploaded to the coordinator. The heartbeat reply
repeats the request until the part arrives, so each checkpoint is taken once here, and taken
again only if saving it failed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

import torch

from protos import swarmtrain_pb2 as pb
from worker.pipeline import StageExecutor
from worker.replicas import params_digest
from worker.replicas.state_transfer import locked
from worker.runtime.checkpoint_format import CheckpointLink, DataPosition, pack, snapshot
from worker.runtime.first_stage import DataCursor
from worker.runtime.local_stage import LocalStage
from worker.runtime.state_download import one_line
from worker.runtime.traffic import TrafficMeter
from worker.telemetry.trace import Trace

Log = Callable[[str], None]


class RunningStage(Protocol):
    """What a save needs of the running role."""

    index: int
    local: LocalStage

    def executor(self) -> StageExecutor | None: ...

    def live_step(self) -> int: ...


class CheckpointSaver:
    """Saves the running stage's part of the checkpoints the coordinator asks for, once each."""

    def __init__(self, link: CheckpointLink | None, running: Callable[[], RunningStage | None],
                 data: DataCursor, meter: TrafficMeter, log: Log, trace: Trace) -> None:
        self.link, self.running, self.data = link, running, data
        self.meter, self.log, self.trace = meter, log, trace
        self._taken: set[int] = set()  # checkpoint ids being saved or saved
        self._tasks: set[asyncio.Task[None]] = set()

    def request(self, request: pb.CheckpointRequest) -> None:
        """The coordinator asked for our stage's part of a checkpoint (on the loop, from a heartbeat
        reply, which repeats the request until the part arrives)."""
        if self.link is None or request.checkpoint_id in self._taken:
            return
        self._taken.add(request.checkpoint_id)
        task = asyncio.create_task(self._save(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _save(self, request: pb.CheckpointRequest) -> None:
        assert self.link is not None
        role = self.running()
        if role is None or role.local.span != (request.layer_start, request.layer_end) \
                or role.index != request.stage_index:
            # not running that stage (yet): a stage still resuming must not overwrite the
            # checkpoint it resumes from with its seed. The next heartbeat asks again.
            self._taken.discard(request.checkpoint_id)
            return
        local, started = role.local, time.monotonic()
        stage, optimizer, sync = local.module, local.optimizer, local.sync

        def take() -> tuple[dict[str, torch.Tensor], int, int, DataPosition | None]:
            return snapshot(stage, optimizer, sync), role.live_step(), sync.round, \
                self.data.at if stage.is_first else None

        try:
            tensors, step, round_number, data = await locked(role.executor(), take)  # type: ignore[misc]
            header, blob = await asyncio.to_thread(pack, tensors, request, step, round_number, data)
            digest = params_digest([tensors[f"param/{name}"] for name, _ in stage.named_parameters()])
            # written before the upload: once the coordinator holds the part, its event is on disk
            self.trace.write("checkpoint_upload", checkpoint=request.checkpoint_id,
                             stage=request.stage_index, step=step, digest=digest,
                             **({"data": data.microbatches} if data is not None else {}))
            complete = await self.link.upload(header, blob)
        except Exception as err:  # noqa: BLE001 - asked again by the next heartbeat if still wanted
            self._taken.discard(request.checkpoint_id)
            self.log(f"stage {request.stage_index}: checkpoint {request.checkpoint_id} not saved "
                     f"({one_line(err)})")
            return
        self.meter.state(sent=len(blob))
        self.log(f"stage {request.stage_index} saved to checkpoint {request.checkpoint_id} at step {step} "
                 f"({len(blob) / 1e6:.1f} MB in {time.monotonic() - started:.1f}s)"
                 + ("; the checkpoint is complete" if complete else ""))
        self.trace.write("checkpoint", checkpoint=request.checkpoint_id, stage=request.stage_index, step=step,
                         digest=digest, bytes=len(blob), complete=complete,
                         **({"data": data.microbatches} if data is not None else {}))
