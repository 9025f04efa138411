"""What runs for an assignment: the `StageRuntime` the lifecycle starts, switches and stops.

`TrainingRuntime` (worker.runtime.training) trains its stage in the pipeline; `HoldingRuntime`
only builds and holds the stage module.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import torch

from configs.schema import RunConfig
from protos import swarmtrain_pb2 as pb
from worker.app.descriptions import describe_layers
from worker.telemetry.counters import CounterBook

Log = Callable[[str], None]


class StageRuntime(Protocol):
    """Runs the worker's share of the model. The lifecycle calls these one at a time, from a
    worker thread (they may block for as long as building a stage takes)."""

    def start(self, assignment: pb.Assignment) -> None: ...

    def reassign(self, assignment: pb.Assignment) -> None: ...

    def stop(self) -> None: ...

    def watch(self, on_failure: Callable[[BaseException], None]) -> None:
        """Call `on_failure` (on the event loop) if the stage's own work dies of an error later,
        after `start` returned; the lifecycle then leaves the swarm with that error."""


RuntimeFactory = Callable[[RunConfig, torch.device, CounterBook, Log], StageRuntime]


class HoldingRuntime:
    """Builds the assigned stage and holds it in memory, without training it (for tests and
    checks of the lifecycle alone)."""

    def __init__(self, config: RunConfig, device: torch.device, counters: CounterBook, log: Log) -> None:
        self.config = config
        self.device = device
        self.counters = counters  # where a training runtime reports its work
        self.log = log
        self.stage: torch.nn.Module | None = None
        self.span: tuple[int, int] | None = None

    def start(self, assignment: pb.Assignment) -> None:
        from worker.model.stage import build_stage  # the model code loads only once there is a stage

        span = (assignment.layer_start, assignment.layer_end)
        layers = describe_layers(*span, self.config.model.n_layer)
        self.log(f"building stage {assignment.stage_index} ({layers}) on {self.device.type}…")
        started = time.perf_counter()
        stage = build_stage(self.config.model, *span, self.config.training.seed).to(self.device)
        self.stage, self.span = stage, span
        params = sum(p.numel() for p in stage.parameters())
        self.log(f"stage {assignment.stage_index} ready: {params:,} parameters on {self.device.type} in "
                 f"{time.perf_counter() - started:.1f}s · holding stage; pipeline training not started")

    def reassign(self, assignment: pb.Assignment) -> None:
        if self.stage is not None and self.span == (assignment.layer_start, assignment.layer_end):
            return  # same layers (new codec, shard or plan version): nothing to rebuild
        self.stop()
        self.start(assignment)

    def stop(self) -> None:
        self.stage, self.span = None, None

    def watch(self, on_failure: Callable[[BaseException], None]) -> None:
        pass  # nothing runs beside the calls themselves
