"""Which data each stage-0 replica trains: ranges of a seeded permutation, each handed out once.

With prepared data (`data.prepared`) an epoch is the positions 0..P-1 of a permutation of the
train sequences drawn from (training.seed, epoch) (configs/data/permutation.py; P is the
sequence count rounded down to whole optimizer steps). The ledger carves the positions into
ranges of `data.handout_steps` steps, in order, and keeps every stage-0 replica holding
`HELD_RANGES` of them (one to train, one ready). Replicas report, with each heartbeat, how much
of each range they trained; a replica that stops holding stage 0 (gone, left, banned, moved to
another stage) keeps what it reported, and the rest of each of its ranges becomes a new range,
handed out before any fresh position. So within an epoch every position is trained once: never
skipped, never twice, as far as the reports go (a replica that dies loses the steps it trained
since its last report, and they are trained again by another: its stage-0 weights died with it,
though later stages had stepped on them, so for those a heartbeat's worth of steps counts twice).

Ranges are written to the store before the heartbeat that handed or acknowledged them is
answered, so a coordinator restart keeps the whole ledger. Pure but for the store it is given.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Protocol

from coordinator.storage.data_ranges import DataRange

__all__ = ["HELD_RANGES", "DataLedger", "RangeStore"]

HELD_RANGES = 2  # per stage-0 replica: the one it trains and the next, so it never waits for a heartbeat


class RangeStore(Protocol):
    def save(self, ranges: Sequence[DataRange], *, replace_all: bool = False) -> None: ...


class DataLedger:
    """Hands out the epoch's positions in ranges and records how far each is trained."""

    def __init__(self, positions: int, range_size: int, store: RangeStore, ranges: Iterable[DataRange] = (),
                 next_id: int = 1) -> None:
        if positions < 1 or range_size < 1:
            raise ValueError(f"a ledger needs positions >= 1 and range_size >= 1 (got {positions}, {range_size})")
        self.positions, self.range_size, self.store = positions, range_size, store
        self._next_id = next_id  # the store's high-water mark: ids never repeat, across restarts too
        self._restore(list(ranges))

    def _restore(self, every: list[DataRange]) -> None:
        self.open = {r.range_id: r for r in every if not r.done}  # finished ranges live in the store only
        # ids never repeat: a replica may still report on one from before a rewind
        self._next_id = max(max((r.range_id for r in every), default=0) + 1, self._next_id)
        last = max(((r.epoch, r.end) for r in every), default=(0, 0))
        self.epoch, self.cursor = last if last[1] < self.positions else (last[0] + 1, 0)

    def report(self, worker_id: str, progress: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """Record what `worker_id` says it trained of its ranges, and return (range, trained) as
        recorded for each it holds. Reports on ranges it does not hold (any more) are ignored and
        not acknowledged: those positions are someone else's now."""
        changed, acknowledged = [], []
        for range_id, trained in progress:
            held = self.open.get(range_id)
            if held is None or held.worker_id != worker_id:
                continue
            trained = max(held.trained, min(trained, held.end - held.start))
            acknowledged.append((range_id, trained))
            if trained > held.trained:
                now = replace(held, trained=trained, worker_id="" if held.start + trained >= held.end else worker_id)
                changed.append(now)
                if now.done:
                    del self.open[range_id]
                else:
                    self.open[range_id] = now
        self.store.save(changed)
        return acknowledged

    def held_by(self, worker_id: str) -> list[DataRange]:
        """`worker_id`'s unfinished ranges, topped up to HELD_RANGES (oldest first)."""
        held = sorted((r for r in self.open.values() if r.worker_id == worker_id), key=lambda r: r.range_id)
        handed = []
        while len(held) < HELD_RANGES:
            waiting = min((r for r in self.open.values() if not r.worker_id), default=None,
                          key=lambda r: (r.epoch, r.start))
            fresh = replace(waiting, worker_id=worker_id) if waiting is not None else self._carve(worker_id)
            self.open[fresh.range_id] = fresh
            held.append(fresh)
            handed.append(fresh)
        self.store.save(handed)
        return held

    def _carve(self, worker_id: str) -> DataRange:
        if self.cursor >= self.positions:
            self.epoch, self.cursor = self.epoch + 1, 0
        end = min(self.cursor + self.range_size, self.positions)
        fresh = DataRange(self._next_id, self.epoch, self.cursor, end, worker_id=worker_id)
        self._next_id += 1
        self.cursor = end
        return fresh

    def release(self, holders: set[str]) -> None:
        """Take back the ranges of every worker not in `holders` (stage 0's active replicas): the
        trained part of each stays its own, the rest becomes a new range, first to be handed out."""
        changed = []
        for held in [r for r in self.open.values() if r.worker_id and r.worker_id not in holders]:
            del self.open[held.range_id]
            if held.trained:
                changed.append(replace(held, end=held.start + held.trained, worker_id=""))
                rest = DataRange(self._next_id, held.epoch, held.start + held.trained, held.end)
                self._next_id += 1
            else:
                rest = replace(held, worker_id="")
            self.open[rest.range_id] = rest
            changed.append(rest)
        self.store.save(changed)

    def rewind(self, ranges: list[DataRange]) -> None:
        """Go back to `ranges`, a checkpoint's snapshot of the ledger ([]: the seed's, nothing handed
        out): what was trained since is handed out again, and no replica holds anything."""
        every = [replace(r, worker_id="") for r in ranges]
        self.store.save(every, replace_all=True)
        self._restore(every)
