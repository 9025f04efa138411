"""Realistic random fleets for planner tests and benchmarks."""

from __future__ import annotations

import numpy as np

from configs.catalog import load_catalog
from configs.link import Link
from coordinator.planning.planner import WorkerCapacity


def catalog_fleet(rng: np.random.Generator, size: int) -> list[WorkerCapacity]:
    """Cards from configs/gpus.yaml at 30-60% of their bf16 peak, with 85-95% of their memory,
    links from 10 Mbit/s to 10 Gbit/s up and 1-4x that down."""
    cards = list(load_catalog())
    fleet = []
    for i in range(size):
        card = cards[rng.integers(len(cards))]
        up = 10 ** rng.uniform(7, 10)
        fleet.append(WorkerCapacity(
            worker_id=f"{card.id}-{i}",
            achieved_flops=card.peak("bf16") * rng.uniform(0.3, 0.6),
            memory_bytes=int(card.memory_bytes * rng.uniform(0.85, 0.95)),
            link=Link.from_bits_per_s(up, up * rng.uniform(1, 4)),
        ))
    return fleet
