"""Our stage as it lives on this worker across role restarts: built once for a span of layers.

A re-assignment that keeps the span (another stage index, new settings) keeps the parameters,
the optimizer's state, the averaging anchor and the step count; one to other layers, or of another
generation (the swarm rolled back: coordinator/swarm/rollback.py), builds anew.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from configs.schema import RunConfig
from worker.replicas import StageState
from worker.replicas.diloco import OuterSettings, ReplicaSync
from worker.replicas.state_transfer import load_state
from worker.telemetry.counters import CounterBook


@dataclass
class LocalStage:
    """The stage's module, optimizer and averaging anchor (`sync`), and the optimizer steps it took."""

    span: tuple[int, int]
    module: Any  # worker.model.stage.StageModule
    optimizer: torch.optim.Optimizer
    sync: ReplicaSync  # the anchor of its averaging rounds
    counters: CounterBook
    steps: int = 0
    build_s: float = 0.0  # how long building it took
    generation: int = 0  # the swarm's generation it was built for

    @classmethod
    def build(cls, config: RunConfig, span: tuple[int, int], device: torch.device, counters: CounterBook,
              outer: OuterSettings, lie_scale: float | None = None, generation: int = 0) -> LocalStage:
        """The seed's stage on `device` (in the calling thread: this takes a while)."""
        from worker.model.stage import build_stage
        from worker.runtime.standalone import build_optimizer

        started = time.perf_counter()
        module = build_stage(config.model, *span, seed=config.training.seed).to(device)
        sync = ReplicaSync(list(module.parameters()), outer, lie_scale=lie_scale)
        return cls(span, module, build_optimizer(module, config.training), sync, counters,
                   build_s=time.perf_counter() - started, generation=generation)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def set_steps(self, steps: int) -> None:
        self.steps = steps
        self.counters.set_local_step(steps)

    def add_steps(self, steps: int) -> None:
        self.set_steps(self.steps + steps)

    def lr_at(self, training: Any) -> Callable[[int], float]:
        """The run's learning rate at a new executor's step `n`, counted from our steps now."""
        from worker.model.schedule import learning_rate_at

        offset = self.steps
        return lambda step: learning_rate_at(offset + step, training)

    def take_anchor(self, state: StageState) -> None:
        """Our parameters and averaging anchor become `state`'s (a download, or a catch-up); under
        the stage's lock where something computes on it."""
        load_state(self.module, state.tensors)
        self.sync.reset(state.tensors, state.round)
