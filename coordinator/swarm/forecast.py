"""The rate model's forecast for the live swarm: what it should train now, beside what it does.

The plan's own rate is its slowest stage's at the rates known when it was made, as if the
pipeline were always full. This one takes the live workers where they serve, at the compute
rates their heartbeats measured, and counts the pipeline's fill and drain and averaging's
share of the links (coordinator/planning/pipeline_rate.py): the figure to hold the measured
tokens/s against.
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

from coordinator.planning.pipeline_rate import PipelineEstimate, live_estimate, schedule_of
from coordinator.swarm.orchestrator import Swarm

__all__ = ["expected_rate", "forecast"]

# GetSwarm and /metrics read the forecast on every call, and workers call GetSwarm often: it is
# computed at most once per MAX_AGE_S per plan (a large swarm prices every live worker)
MAX_AGE_S = 1.0
_recent: WeakKeyDictionary[Swarm, tuple[float, int, float]] = WeakKeyDictionary()


def forecast(swarm: Swarm) -> PipelineEstimate | None:
    """None before a plan, or while a stage has no live worker that holds it."""
    if swarm.plan is None:
        return None
    workers = [swarm.capacity(r) for r in swarm.registry.active()]
    schedule = schedule_of(swarm.config.training, swarm.policy)
    return live_estimate(swarm.profile, workers, swarm.plan.boundaries, schedule)


def expected_rate(swarm: Swarm) -> float:
    now, version = swarm.clock(), swarm.plan_version
    seen = _recent.get(swarm)
    if seen is not None and seen[1] == version and 0 <= now - seen[0] < MAX_AGE_S:
        return seen[2]
    estimate = forecast(swarm)
    rate = estimate.rate if estimate else 0.0
    _recent[swarm] = (now, version, rate)
    return rate
