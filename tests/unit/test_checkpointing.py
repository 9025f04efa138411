"""When the coordinator opens checkpoints: the first early once training starts, then on the
interval; the final one at once. A real registry and checkpoint store in a temporary state dir."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from configs.loader import load_config
from coordinator.planning.plan import Plan
from coordinator.storage.registry import Registry, new_record
from coordinator.swarm.checkpointing import Checkpointing

PLAN = Plan(boundaries=(0, 4), stage_of={"w1": 0}, stage_rates=(1.0,))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def checkpointing(tmp_path: Path, *overrides: str) -> tuple[Checkpointing, Clock, list]:
    config = load_config("tiny", [f"coordinator.state_dir={tmp_path / 'state'}", *overrides])
    registry = Registry(config.coordinator.state_dir, config.coordinator.run_id, config.fingerprint())
    clock = Clock()
    worker = replace(new_record("w1", "t", b"", clock(), 60.0, "127.0.0.1"), stage_index=0)
    return Checkpointing(config, registry, clock), clock, [worker]


def test_the_first_checkpoint_comes_early_once_training_starts_then_on_the_interval(tmp_path: Path) -> None:
    ckpt, clock, active = checkpointing(tmp_path, "coordinator.checkpoint_interval_s=1800",
                                        "coordinator.first_checkpoint_s=120")
    clock.now += 5_000  # workers came late: nothing trained, nothing to save
    ckpt.tick(PLAN, active, 0, final_due=False)
    assert ckpt.store.open is None
    ckpt.tick(PLAN, active, 2048, final_due=False)  # training started: the count starts now
    clock.now += 119
    ckpt.tick(PLAN, active, 4096, final_due=False)
    assert ckpt.store.open is None
    clock.now += 2
    ckpt.tick(PLAN, active, 8192, final_due=False)
    assert ckpt.store.open is not None and ckpt.store.open.writers == {0: "w1"}
    ckpt.store.abandon("test")  # the next one waits a whole interval
    clock.now += 1_700
    ckpt.tick(PLAN, active, 9000, final_due=False)
    assert ckpt.store.open is None
    clock.now += 101
    ckpt.tick(PLAN, active, 9000, final_due=False)
    assert ckpt.store.open is not None


def test_the_final_checkpoint_is_taken_at_once_even_with_periodic_ones_off(tmp_path: Path) -> None:
    ckpt, clock, active = checkpointing(tmp_path, "coordinator.checkpoint_interval_s=0")
    clock.now += 10_000
    ckpt.tick(PLAN, active, 4096, final_due=False)
    assert ckpt.store.open is None  # off
    ckpt.tick(PLAN, active, 4096, final_due=True)
    assert ckpt.store.open is not None and ckpt.store.open.trained_tokens == 4096
    assert ckpt.final(4096) is None  # open, not complete: the run is not over yet
