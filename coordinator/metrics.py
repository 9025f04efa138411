"""Prometheus metrics of the coordinator, read from the swarm at scrape time.

One custom collector owns every metric, so nothing has to be kept in step by hand and
tests can scrape their own CollectorRegistry.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from configs.version import SOFTWARE_VERSION
from coordinator.swarm import Swarm


class SwarmCollector(Collector):
    def __init__(self, swarm: Swarm) -> None:
        self.swarm = swarm

    def collect(self) -> Iterator[object]:
        swarm = self.swarm
        info = InfoMetricFamily("swarmtrain_build", "swarmtrain build and run")
        info.add_metric([], {"version": SOFTWARE_VERSION, "run_id": swarm.config.coordinator.run_id,
                             "config_hash": swarm.config_hash})
        yield info

        workers = GaugeMetricFamily("swarmtrain_workers", "Workers by stage and state", labels=["stage", "state"])
        counts = Counter((str(r.stage_index) if r.stage_index >= 0 else "none", r.state)
                         for r in swarm.registry.workers.values())
        for stage in range(swarm.plan.num_stages if swarm.plan else 0):
            counts.setdefault((str(stage), "active"), 0)  # an unserved stage shows as 0, not as absent
        for (stage, state), n in sorted(counts.items()):
            workers.add_metric([stage, state], n)
        yield workers

        progress = swarm.registry.progress
        yield CounterMetricFamily("swarmtrain_trained_tokens", "Tokens trained through the last stage",
                                  value=progress.trained_tokens)
        loss = progress.last_loss if progress.loss_count else math.nan
        yield GaugeMetricFamily("swarmtrain_training_loss", "Latest mean training loss", value=loss)
        yield GaugeMetricFamily("swarmtrain_plan_version", "Version of the current plan", value=swarm.plan_version)
        yield GaugeMetricFamily("swarmtrain_planned_tokens_per_second",
                                "The plan's expected swarm throughput (slowest stage)", value=swarm.swarm_rate())


def serve_metrics(swarm: Swarm, host: str, port: int) -> tuple[CollectorRegistry, int, object]:
    """Start the /metrics HTTP server; returns the registry, the bound port and the server."""
    registry = CollectorRegistry()
    registry.register(SwarmCollector(swarm))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return registry, server.server_port, server
