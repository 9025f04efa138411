"""The order an epoch of prepared data is trained in: shards shuffled, then sequences within each.

The coordinator hands out consecutive positions of this order (coordinator/swarm/data_ledger.py).
A flat permutation of every sequence would spread each handed-out range over all shards, and a
volunteer would have to fetch the whole corpus to train a few steps; here the shards come in a
seeded order and each shard's sequences in a seeded order of their own, so a range of a few
hundred sequences lies in one shard (two where it crosses a boundary), and a worker fetches
only the shards it trains. Both orders are drawn per epoch from the run's seed: every worker
maps a position to the same sequence.
"""

from __future__ import annotations

import numpy as np

from configs.data.permutation import SeededPermutation

__all__ = ["EpochOrder"]


class EpochOrder:
    """Epoch `epoch`'s order of a split whose shards hold `counts` sequences each."""

    def __init__(self, counts: list[int], seed: int, epoch: int) -> None:
        self.counts = np.asarray(counts, dtype=np.int64)
        self.seed, self.epoch = seed, epoch
        self.shard_order = SeededPermutation(len(counts), (seed, epoch, 0))(np.arange(len(counts)))
        # where each shard's block starts in this order, and its first sequence in the split's numbering
        self.block_starts = np.concatenate([[0], np.cumsum(self.counts[self.shard_order])])
        self.first_ids = np.concatenate([[0], np.cumsum(self.counts)])
        self._within: dict[int, SeededPermutation] = {}

    @property
    def size(self) -> int:
        return int(self.block_starts[-1])

    def shards(self, start: int, count: int) -> list[int]:
        """The shards positions [start, start + count) lie in (one, or a few at block boundaries)."""
        first = int(np.searchsorted(self.block_starts, start, side="right")) - 1
        last = int(np.searchsorted(self.block_starts, start + count - 1, side="right")) - 1
        return [int(self.shard_order[k]) for k in range(first, last + 1) if self.counts[self.shard_order[k]]]

    def ids(self, positions: np.ndarray) -> np.ndarray:
        """The split's sequence numbers at `positions` of this epoch's order."""
        positions = np.asarray(positions, dtype=np.int64)
        blocks = np.searchsorted(self.block_starts, positions, side="right") - 1
        shards = self.shard_order[blocks]
        ids = np.empty_like(positions)
        for shard in np.unique(shards):
            here = shards == shard
            local = positions[here] - self.block_starts[blocks[here]]
            ids[here] = self.first_ids[shard] + self._within_shard(int(shard))(local)
        return ids

    def _within_shard(self, shard: int) -> SeededPermutation:
        if shard not in self._within:
            self._within[shard] = SeededPermutation(int(self.counts[shard]), (self.seed, self.epoch, shard + 1))
        return self._within[shard]
