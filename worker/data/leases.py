"""The data ranges the coordinator handed this stage-0 replica, and how far each is trained.

On prepared data the coordinator decides which sequences stage 0 trains (its data ledger,
coordinator/swarm/data_ledger.py): heartbeat replies list the ranges this replica holds, as
positions of an epoch's seeded permutation. Steps take their sequences from the oldest held
range (`take`), in order; a trained step counts (`trained`); heartbeats report the counts
(`progress`) and their replies acknowledge them (`update` returns the newly acknowledged spans,
for the trace: a span is acknowledged to one replica only, so the spans of all replicas never
overlap within an epoch).

Shared by the heartbeat loop and the training loop, which may run on different threads.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from protos import swarmtrain_pb2 as pb

__all__ = ["DataLeases", "Span", "Taken"]


@dataclass(frozen=True)
class Span:
    """Positions [start, end) of epoch `epoch`'s permutation, acknowledged as trained."""

    range_id: int
    epoch: int
    start: int
    end: int


@dataclass(frozen=True)
class Taken:
    """One step's positions, taken from one range (as the replica held it: `serial`)."""

    range_id: int
    epoch: int
    start: int
    count: int
    serial: int = 0  # which holding of the range: a rollback may hand the same range back afresh


@dataclass
class _Held:
    epoch: int
    start: int
    end: int
    taken: int  # positions given to steps, from start
    trained: int  # positions trained, from start
    acknowledged: int  # positions the coordinator recorded as trained
    serial: int  # this holding's number: steps taken under an earlier one count for nothing


class DataLeases:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, _Held] = {}
        self._serials = 0
        self.fingerprint = ""  # of the coordinator's prepared data; "" until a first reply lists ranges

    def update(self, reply: pb.HeartbeatResponse) -> list[Span]:
        """Apply a heartbeat reply: the acknowledgements, then (when it lists them) the ranges held
        now; ranges no longer listed are dropped. Returns the spans newly acknowledged."""
        spans = []
        with self._lock:
            for ack in reply.data_acknowledged:
                held = self._held.get(ack.range_id)
                if held is not None and ack.trained > held.acknowledged:
                    spans.append(Span(ack.range_id, held.epoch, held.start + held.acknowledged, held.start + ack.trained))
                    held.acknowledged = ack.trained
            if reply.data_fingerprint:
                self.fingerprint = reply.data_fingerprint
                listed = {r.range_id: r for r in reply.data_ranges}
                for range_id in [i for i in self._held if i not in listed]:
                    del self._held[range_id]
                for range_id, r in listed.items():
                    held = self._held.get(range_id)
                    # new; or handed back afresh after a rollback (the coordinator's count fell, or the
                    # bounds changed): the steps trained on the discarded weights no longer count
                    if held is None or (held.epoch, held.start, held.end) != (r.epoch, r.start, r.end) \
                            or r.trained < held.acknowledged:
                        self._serials += 1
                        self._held[range_id] = _Held(r.epoch, r.start, r.end, r.trained, r.trained, r.trained,
                                                     self._serials)
        return spans

    def progress(self) -> list[pb.DataProgress]:
        """How far each held range is trained, for the next heartbeat (absolute counts)."""
        with self._lock:
            return [pb.DataProgress(range_id=i, trained=h.trained) for i, h in self._held.items()
                    if h.trained > h.acknowledged]

    def take(self, count: int, peek: bool = False, expected: Taken | None = None) -> Taken | None:
        """The next `count` positions of the oldest held range that has them; None when no held range
        has (wait for the next heartbeat). Ranges are whole steps long, so a step never spans two.
        `peek`: say which, without taking them; `expected`: take them only if they are still those
        (a heartbeat may have changed the ranges since the peek), else None."""
        with self._lock:
            for range_id, held in sorted(self._held.items()):
                if held.end - held.start - held.taken >= count:
                    taken = Taken(range_id, held.epoch, held.start + held.taken, count, held.serial)
                    if expected is not None and taken != expected:
                        return None
                    if not peek:
                        held.taken += count
                    return taken
            return None

    def trained(self, step: Taken) -> None:
        """`step` is trained: it counts if its range is still held as it was when the step was taken."""
        with self._lock:
            held = self._held.get(step.range_id)
            if held is not None and held.serial == step.serial:
                held.trained = max(held.trained, step.start + step.count - held.start)

    def give_back(self) -> None:
        """Steps taken but not trained (read ahead, or the role ended) go back to their ranges."""
        with self._lock:
            for held in self._held.values():
                held.taken = held.trained

    def held(self) -> Sequence[Taken]:
        """What is left to take of each held range, oldest first (as one `Taken` each)."""
        with self._lock:
            return [Taken(i, h.epoch, h.start + h.taken, h.end - h.start - h.taken, h.serial)
                    for i, h in sorted(self._held.items()) if h.end - h.start > h.taken]
