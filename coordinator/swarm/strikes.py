"""Peer reports turned into strikes, and strikes into ban verdicts, by the rules of
coordinator/swarm/trust.py. Holds each target's recent strikes in memory (a restarted coordinator
starts counting afresh); the Swarm applies the verdicts."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from coordinator.storage.registry import ACTIVE, WorkerRecord
from coordinator.swarm.trust import Strike, add_strike, ban_verdict, credible


class StrikeBook:
    def __init__(self, threshold: int, min_gap_s: float, clock: Callable[[], float]) -> None:
        self.threshold, self.min_gap_s, self.clock = threshold, min_gap_s, clock
        self._strikes: dict[str, tuple[Strike, ...]] = {}  # target worker id -> its credible reports

    def strike(self, reporter: WorkerRecord, target: WorkerRecord | None, reason: str,
               workers: Mapping[str, WorkerRecord]) -> str | None:
        """Count `reporter`'s report of `target` if it is credible; why to ban `target` now, or None."""
        if (target is None or target.state != ACTIVE or target.worker_id == reporter.worker_id
                or not credible(reason, reporter.stage_index, target.stage_index)):
            return None
        history = add_strike(self._strikes.get(target.worker_id, ()), Strike(reporter.worker_id, reason, self.clock()),
                             min_gap_s=self.min_gap_s)
        self._strikes[target.worker_id] = history
        live = {s.reporter for s in history if workers[s.reporter].state == ACTIVE}
        return ban_verdict(history, self.threshold, live)

    def forget(self, worker_id: str) -> None:
        self._strikes.pop(worker_id, None)
