"""The data ledger as heartbeats see it: stage 0's progress in, its ranges out.

Only a run on prepared data (`data.prepared`) has a ledger; without one, stage 0's replicas
split the corpus they read themselves by replica index, as before, and this does nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from configs.data.errors import DataError
from configs.data.shards import read_manifest
from configs.schema import RunConfig
from coordinator.storage.checkpoints import Checkpoint
from coordinator.storage.data_ranges import DataRangeStore
from coordinator.swarm.data_ledger import DataLedger
from protos import swarmtrain_pb2 as pb


class DataHandout:
    def __init__(self, ledger: DataLedger | None = None, fingerprint: str = "",
                 store: DataRangeStore | None = None) -> None:
        self.ledger, self.fingerprint, self.store = ledger, fingerprint, store
        self._snapshotted = 0  # the last checkpoint the ledger was kept with

    @classmethod
    def for_run(cls, config: RunConfig, db: sqlite3.Connection) -> DataHandout:
        """The run's ledger, restored from the registry; raises DataError when the prepared data
        cannot be read or holds less than one optimizer step."""
        if config.data.prepared is None:
            return cls()
        manifest = read_manifest(config.data.prepared)
        training = config.training
        positions = sum(manifest.sequences("train", training.seq_len)) // training.batch_size * training.batch_size
        if not positions:
            raise DataError(f"data.prepared: {config.data.prepared} holds fewer train sequences of "
                            f"seq_len+1={training.seq_len + 1} tokens than one batch_size={training.batch_size}: "
                            "lower training.batch_size or training.seq_len, or prepare more text")
        store = DataRangeStore(db)
        ledger = DataLedger(positions, training.batch_size * config.data.handout_steps, store, store.load(),
                            store.next_id())
        return cls(ledger, manifest.fingerprint, store)

    def note(self, worker_id: str, progress: Iterable[pb.DataProgress]) -> list[pb.DataProgress]:
        """Record a heartbeat's progress; what to acknowledge in its response (`data_acknowledged`)."""
        if self.ledger is None:
            return []
        recorded = self.ledger.report(worker_id, ((p.range_id, p.trained) for p in progress))
        return [pb.DataProgress(range_id=range_id, trained=trained) for range_id, trained in recorded]

    def fill(self, response: pb.HeartbeatResponse, worker_id: str) -> None:
        """The ranges `worker_id` (a stage-0 replica) holds now, topped up."""
        if self.ledger is None:
            return
        response.data_fingerprint = self.fingerprint
        for held in self.ledger.held_by(worker_id):
            response.data_ranges.add(range_id=held.range_id, epoch=held.epoch, start=held.start, end=held.end,
                                     trained=held.trained)

    def release(self, holders: set[str]) -> None:
        if self.ledger is not None:
            self.ledger.release(holders)

    def snapshot(self, checkpoint: Checkpoint | None) -> None:
        """Keep the ledger with a checkpoint that has just opened: a rollback to it rewinds the data too.
        Taken as the checkpoint opens, a little before stage 0 saves its state: a rollback may hand
        out again the few steps in between (trained twice), never skip any."""
        if self.store is not None and checkpoint is not None and checkpoint.checkpoint_id != self._snapshotted:
            self.store.snapshot(checkpoint.checkpoint_id)
            self._snapshotted = checkpoint.checkpoint_id

    def rewind(self, checkpoint_id: int) -> None:
        """The swarm went back to checkpoint `checkpoint_id` (0: the seed): so does the data."""
        if self.ledger is None or self.store is None:
            return
        ranges = [] if checkpoint_id == 0 else self.store.snapshot_of(checkpoint_id)
        if ranges is None:  # a checkpoint from before the ledger kept snapshots: keep what it has
            print(f"warning: checkpoint {checkpoint_id} holds no data position; the data goes on from where "
                  "it was", flush=True)
            return
        self.ledger.rewind(ranges)
