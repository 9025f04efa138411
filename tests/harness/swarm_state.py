"""A coordinator's Swarm over a real SQLite registry, with a clock the test controls (no processes)."""

from __future__ import annotations

from pathlib import Path

from configs.loader import load_config
from configs.version import SOFTWARE_VERSION
from coordinator.storage.registry import Registry
from coordinator.swarm.orchestrator import Swarm
from protos import swarmtrain_pb2 as pb

SMALL = 50 * 2**20  # a CPU worker (no GPU in its profile) that cannot hold tiny whole: forces a pipeline


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def profile(memory: int = SMALL, flops: float = 5e12, bps: float = 1e9) -> pb.WorkerProfile:
    return pb.WorkerProfile(software_version=SOFTWARE_VERSION, memory_bytes=memory, achieved_flops=flops,
                            upload_bps=bps, download_bps=bps)


def make_swarm(state: Path, clock: Clock, *overrides: str) -> Swarm:
    config = load_config("tiny", list(overrides))
    registry = Registry(state, config.coordinator.run_id, config.fingerprint())
    return Swarm(config, registry, clock=clock)
