"""What the live swarm costs while it trains: $ per hour, $ spent, energy, and the datacenter comparison.

Pure pieces (`worker_rates`, `SwarmRates.of`) turn workers' profiles into rates; `CostMeter`
integrates the rates over time, fed the clock by whoever calls it (the coordinator's sweep
and every scrape), so the time between two calls is billed at the rates seen at the
second. With calls a heartbeat interval apart, a join or departure is billed at most that
late or early.

Prices: a worker's declared `usd_per_hour` wins; otherwise the catalog's price for the GPU
its name matches; a CPU worker or an unknown GPU costs 0 (and draws 0 W): the meter counts
what it can name, never guesses.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from configs.catalog import GpuCatalog
from coordinator.costs.model import (
    DEFAULT_MFU,
    JOULES_PER_KWH,
    SECONDS_PER_HOUR,
    achieved_flops,
    training_seconds,
)
from protos import swarmtrain_pb2 as pb

DATACENTER_MFU = DEFAULT_MFU  # the reference run is credited the same efficiency as `coordinator plan`'s



@dataclass(frozen=True)
class WorkerRates:
    usd_per_hour: float
    watts: float
    peak_flops: float


@dataclass(frozen=True)
class SwarmRates:
    """The live workers' summed rates."""

    usd_per_hour: float = 0.0
    watts: float = 0.0
    peak_flops: float = 0.0

    @classmethod
    def of(cls, rates: Iterable[WorkerRates]) -> SwarmRates:
        usd = watts = flops = 0.0
        for r in rates:
            usd, watts, flops = usd + r.usd_per_hour, watts + r.watts, flops + r.peak_flops
        return cls(usd, watts, flops)


def worker_rates(profile: pb.WorkerProfile, catalog: GpuCatalog) -> WorkerRates:
    """One worker's $/h, board power and peak FLOP/s, from its profile and the catalog (pure)."""
    spec = catalog.match_device_name(profile.gpu_name) if profile.gpu_name else None
    gpus = max(1, profile.gpu_count) if spec is not None else 0
    price = profile.usd_per_hour if profile.usd_per_hour > 0 else (spec.usd_per_hour * gpus if spec else 0.0)
    watts = spec.board_power_watts * gpus if spec is not None else 0.0
    # the peak the worker reported at the run's precision; a CPU reports its measured rate
    peak = profile.peak_flops if profile.peak_flops > 0 else profile.achieved_flops
    return WorkerRates(price, watts, peak)


def datacenter_usd(model_flops: float, reference_peak_flops: float, reference_usd_per_hour: float,
                   efficiency: float) -> float:
    """What `model_flops` of training costs on rented reference GPUs at `efficiency` of their peak (pure)."""
    if reference_peak_flops <= 0 or efficiency <= 0:
        return 0.0
    seconds = training_seconds(model_flops, achieved_flops(reference_peak_flops, efficiency))
    return seconds / SECONDS_PER_HOUR * reference_usd_per_hour


class CostMeter:
    """Dollars and joules the swarm has spent, integrated from its rates over time."""

    def __init__(self, energy_usd_per_kwh: float) -> None:
        self.energy_usd_per_kwh = energy_usd_per_kwh
        self.usd = 0.0
        self.joules = 0.0
        self.rates = SwarmRates()
        self._last: float | None = None

    def accrue(self, now: float, rates: SwarmRates) -> None:
        """Bill the time since the last call at `rates`, then remember them."""
        if self._last is not None and now > self._last:
            seconds = now - self._last
            self.usd += rates.usd_per_hour * seconds / SECONDS_PER_HOUR
            self.joules += rates.watts * seconds
        if self._last is None or now > self._last:
            self._last = now
        self.rates = rates

    @property
    def energy_usd(self) -> float:
        return self.joules / JOULES_PER_KWH * self.energy_usd_per_kwh
