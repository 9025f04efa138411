"""Where stage 0's batches come from, and how far it trained them (kept across roles and checkpoints).

Two ways, by what the run trains on:
- a corpus each replica reads itself (`data.paths`): replica shard `s` of `n` (the assignment's
  `data_shard_index`/`data_shard_count`), from where this stage stopped: `at`, which
  checkpoints keep, says how many microbatches of which shard;
- prepared data (`data.prepared`): the ranges the coordinator hands out (worker/data/leases.py),
  so the coordinator's ledger, not this replica, knows what is trained; `at` stays None.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch

from configs.data.errors import DataError
from configs.schema import RunConfig
from worker.data.leases import DataLeases, Taken
from worker.data.shard_cache import ShardSource
from worker.runtime.checkpoint_format import DataPosition

Batch = tuple[torch.Tensor, torch.Tensor]


class DataCursor:
    def __init__(self, config: RunConfig, leases: DataLeases | None = None, source: ShardSource | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.config, self.source, self.log = config, source, log
        self.data: Any = None  # TokenData or PreparedData, built by the first stage 0 assignment
        self.at: DataPosition | None = None  # microbatches trained of the shard
        self.leases = leases if config.data.prepared is not None else None
        self._batches: Iterator[Batch] | None = None
        self.waiting_on = "data"  # why next_step said None: "data" (no range handed out) or "shards" (fetching)
        self._steps: deque[Taken] = deque()  # handed-out steps taken, not yet trained, oldest first

    def prepare(self) -> None:
        """Build the token data (in the calling thread: reading the corpus takes a while). Prepared
        data is read where `data.prepared` names it, or fetched: when `data.url` is set, or when
        this machine has no such directory (then from the coordinator)."""
        if self.data is None:
            from worker.data.source import open_token_data

            training = self.config.training
            self.data = open_token_data(self.config.data, training.seq_len, training.seed, self.source, self.log)

    def open(self, shard: int, shards: int) -> None:
        """Read data shard `shard` of `shards` from where this stage stopped (a re-assignment, a
        checkpoint, a split into another number of shards), not its beginning. Handed-out data
        has no shards: nothing to do."""
        if self.leases is not None:
            return
        at = self.at
        start = 0 if at is None else at.microbatches if (at.shard_index, at.shard_count) == (shard, shards) \
            else at.start_for(shards)
        self.at = DataPosition(shard, shards, start)
        self._batches = self.data.train_batches(self.config.training.micro_batch_size, shard, shards,
                                                start_step=start)

    def next_step(self, microbatches: int) -> list[Batch] | None:
        """One optimizer step's microbatches; None while the coordinator has handed out no data."""
        if self.leases is None:
            assert self._batches is not None
            return [next(self._batches) for _ in range(microbatches)]
        if self.leases.fingerprint and self.leases.fingerprint != self.data.fingerprint:
            raise DataError(f"data.prepared: this worker's copy (fp {self.data.fingerprint[:8]}) is not the "
                            f"coordinator's (fp {self.leases.fingerprint[:8]}): use the operator's prepared directory")
        micro = self.config.training.micro_batch_size
        # the shards of every held range, the next step's first: fetched ahead while this one trains
        wanted = [s for left in self.leases.held() for s in self.data.shards_at(left.epoch, left.start, left.count)]
        self.data.fetch_shards(list(dict.fromkeys(wanted)))
        ahead = self.leases.take(microbatches * micro, peek=True)
        if ahead is None:
            self.waiting_on = "data"
            return None
        if not self.data.has_shards(self.data.shards_at(ahead.epoch, ahead.start, ahead.count)):
            self.waiting_on = "shards"
            return None
        taken = self.leases.take(microbatches * micro, expected=ahead)
        if taken is None:  # a heartbeat changed the ranges since the peek: look again next time
            self.waiting_on = "data"
            return None
        self._steps.append(taken)
        return self.data.batches_at(taken.epoch, taken.start, taken.count, micro)

    def trained(self, microbatches: int) -> None:
        """The oldest step not yet trained is trained."""
        if self.leases is not None:
            if self._steps:
                self.leases.trained(self._steps.popleft())
            return
        assert self.at is not None
        self.at = DataPosition(self.at.shard_index, self.at.shard_count, self.at.microbatches + microbatches)

    def give_back(self) -> None:
        """Steps read ahead and not trained go back (to be read again, or by another replica)."""
        if self.leases is not None:
            self._steps.clear()
            self.leases.give_back()
