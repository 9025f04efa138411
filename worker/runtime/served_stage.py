"""Any stage but the first: it serves itself with a `StageServer` under its stage key, steps its AdamW
every `training.batch_size` samples with the run's learning-rate schedule, and moves its counters
to the heartbeat's book every REPORT_INTERVAL_S. The last stage reports each loss it computes: the
coordinator counts progress (tokens and loss) from the last stage's heartbeats only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from hivemind.p2p import P2P

from configs.schema import RunConfig
from worker.pipeline import StageExecutor, StageServer
from worker.pipeline.admission import Admission
from worker.runtime.local_stage import LocalStage
from worker.runtime.traffic import TrafficMeter
from worker.telemetry.counters import CounterBook

REPORT_INTERVAL_S = 0.5  # how often a served stage moves its counters to the heartbeat's book


class ServedStage:
    """Our stage served to the drivers for one role; `after_report` runs after each report."""

    def __init__(self, config: RunConfig, local: LocalStage, key: str, *, p2p: P2P, admission: Admission,
                 counters: CounterBook, meter: TrafficMeter, after_report: Callable[[], None]) -> None:
        training, optimizer = config.training, local.optimizer
        self.local, self.counters, self.meter, self.after_report = local, counters, meter, after_report
        self.server = StageServer(p2p, local.module, key, lambda _: optimizer, training.batch_size,
                                  grad_clip=training.grad_clip, lr_at=local.lr_at(training),
                                  admits=admission.admits, on_refused=counters.report_peer,
                                  on_loss=counters.add_loss, precision=training.precision)
        self._seen = (0, 0, 0.0, 0, time.perf_counter())  # the server's stats at the last report, and when

    @property
    def executor(self) -> StageExecutor:
        return self.server.executor

    def live_step(self) -> int:
        """Optimizer steps of the stage up to now, counting those not yet added to its count."""
        return self.local.steps + self.server.stats.steps - self._seen[3]

    async def start(self) -> None:
        await self.server.start()
        self._seen = (0, 0, 0.0, 0, time.perf_counter())

    async def stop(self) -> None:
        await self.server.stop()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL_S)
            self.flush()

    def flush(self) -> None:
        """Move what the server did since the last report to the book."""
        stats = self.server.stats
        samples, tokens, compute_s, steps, then = self._seen
        now = time.perf_counter()
        computed = max(0.0, stats.compute_s - compute_s)
        self.counters.add_work(tokens=stats.tokens - tokens, samples=stats.samples - samples,
                               compute_s=computed, wait_s=max(0.0, now - then - computed))
        self.meter.pipeline(self.server.traffic)
        self.after_report()
        self.local.add_steps(stats.steps - steps)
        self._seen = (stats.samples, stats.tokens, stats.compute_s, stats.steps, now)
