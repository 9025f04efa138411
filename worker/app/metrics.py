"""The worker's own Prometheus endpoint: its throughput, compute vs. wait, traffic by kind, GPU.

Read at scrape time from the heartbeat's CounterBook totals, so /metrics and the
coordinator see the same counts. The coordinator lists this endpoint in its HTTP service
discovery; the series carry no per-peer label of their own (the discovery adds `worker_id`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import torch
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from configs.version import SOFTWARE_VERSION
from protos import swarmtrain_pb2 as pb
from worker.app.own_status import VOLUNTEER_PAGE, status_json, volunteer_status
from worker.telemetry.counters import CounterBook

KINDS = (pb.TRAFFIC_KIND_ACTIVATIONS, pb.TRAFFIC_KIND_GRADIENTS, pb.TRAFFIC_KIND_STATE)


@dataclass
class WorkerState:
    """What the lifecycle knows that the counters do not; updated as assignments come."""

    device: torch.device
    gpu_name: str = ""
    peak_flops: float = 0.0
    stage: int = -1  # -1 while waiting for a stage
    usd_per_hour: float = 0.0  # the catalog's price for this GPU, 0 on a CPU
    labels: dict[str, str] = field(default_factory=dict)
    # for the volunteer's own page (worker/app/own_status.py)
    public_name: str = ""
    board_watts: float = 0.0  # the catalog's board power for this GPU, 0 on a CPU
    worker_id: str = ""  # once joined
    waiting: str = ""  # why there is no stage, as the coordinator says
    started_unix: float = field(default_factory=time.time)


class WorkerCollector(Collector):
    def __init__(self, counters: CounterBook, state: WorkerState) -> None:
        self.counters, self.state = counters, state

    def collect(self) -> Iterator[object]:
        totals, state = self.counters.totals(), self.state
        info = InfoMetricFamily("swarmtrain_worker_build", "swarmtrain build and this worker's device")
        info.add_metric([], {"version": SOFTWARE_VERSION, "device": state.device.type,
                             "gpu": state.gpu_name or "none"})
        yield info
        yield GaugeMetricFamily("swarmtrain_worker_stage", "Pipeline stage this worker serves (-1: none yet)",
                                value=state.stage)
        yield CounterMetricFamily("swarmtrain_worker_tokens", "Tokens this worker's stage processed",
                                  value=totals.tokens)
        yield CounterMetricFamily("swarmtrain_worker_samples", "Sequences this worker's stage processed",
                                  value=totals.samples)
        yield CounterMetricFamily("swarmtrain_worker_compute_seconds", "Seconds spent computing",
                                  value=totals.compute_seconds)
        yield CounterMetricFamily("swarmtrain_worker_wait_seconds", "Seconds spent waiting for other stages",
                                  value=totals.wait_seconds)
        yield GaugeMetricFamily("swarmtrain_worker_local_step", "Optimizer steps of this worker's stage",
                                value=totals.local_step)
        yield GaugeMetricFamily("swarmtrain_worker_training_loss", "Latest loss (the last stage only)",
                                value=self.counters.last_loss)
        yield GaugeMetricFamily("swarmtrain_worker_peak_flops", "Datasheet peak FLOP/s at the run's precision "
                                "(a CPU: its measured rate)", value=state.peak_flops)
        sent = CounterMetricFamily("swarmtrain_worker_network_sent_bytes", "Bytes sent, by kind", labels=["kind"])
        received = CounterMetricFamily("swarmtrain_worker_network_received_bytes", "Bytes received, by kind",
                                       labels=["kind"])
        raw = CounterMetricFamily("swarmtrain_worker_network_uncompressed_bytes",
                                  "What the sent bytes would have been uncompressed, by kind", labels=["kind"])
        for kind in KINDS:
            mine = next((t for t in totals.traffic if t.kind == kind), pb.TrafficCounter())
            name = pb.TrafficKind.Name(kind).removeprefix("TRAFFIC_KIND_").lower()
            sent.add_metric([name], mine.sent_bytes)
            received.add_metric([name], mine.received_bytes)
            raw.add_metric([name], mine.uncompressed_bytes)
        yield from (sent, received, raw)
        refused = CounterMetricFamily("swarmtrain_worker_refused_messages", "Messages this worker refused from "
                                      "other peers (and reported to the coordinator), by reason", labels=["reason"])
        for reason in ("non_finite", "malformed", "unauthorized", "outlier"):
            refused.add_metric([reason], sum(r.count for r in totals.reports if r.reason == reason))
        yield refused
        yield from _gpu_metrics(state.device)


def _gpu_metrics(device: torch.device) -> Iterator[object]:
    """Memory from torch, utilization from NVML where a CUDA device exists; nothing on a CPU."""
    if device.type != "cuda":
        return
    index = device.index or 0
    free, total = torch.cuda.mem_get_info(index)
    memory = GaugeMetricFamily("swarmtrain_worker_gpu_memory_bytes", "GPU memory by use", labels=["use"])
    memory.add_metric(["allocated"], torch.cuda.memory_allocated(index))
    memory.add_metric(["reserved"], torch.cuda.memory_reserved(index))
    memory.add_metric(["used"], total - free)
    memory.add_metric(["total"], total)
    yield memory
    try:
        utilization = float(torch.cuda.utilization(index)) / 100.0  # needs NVML (nvidia-ml-py)
    except Exception:  # noqa: BLE001 - no NVML: leave the series out rather than guess
        utilization = math.nan
    if math.isfinite(utilization):
        yield GaugeMetricFamily("swarmtrain_worker_gpu_utilization_ratio", "GPU busy time share (NVML)",
                                value=utilization)


def worker_app(counters: CounterBook, state: WorkerState, registry: CollectorRegistry) -> Callable[..., Iterable[bytes]]:
    """A WSGI app: /metrics for Prometheus, and the volunteer's own /status page and /status.json."""
    exposition = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO")
        if path not in ("/status", "/status.json"):
            return exposition(environ, start_response)
        if path == "/status":
            body, kind = VOLUNTEER_PAGE.encode(), "text/html; charset=utf-8"
        else:
            body, kind = status_json(volunteer_status(
                counters.totals(), worker_id=state.worker_id, public_name=state.public_name, stage=state.stage,
                waiting=state.waiting, gpu=state.gpu_name, board_watts=state.board_watts,
                usd_per_hour=state.usd_per_hour, started_unix=state.started_unix, now=time.time())), "application/json"
        start_response("200 OK", [("Content-Type", kind), ("Content-Length", str(len(body))),
                                  ("Cache-Control", "no-store")])
        return [body]

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the volunteer's terminal."""


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def serve_worker_metrics(counters: CounterBook, state: WorkerState, host: str, port: int) -> tuple[int, object]:
    """Start this worker's /metrics and /status on host:port (0: a free port); the bound port and the server."""
    registry = CollectorRegistry()
    registry.register(WorkerCollector(counters, state))
    server = make_server(host, port, worker_app(counters, state, registry), _ThreadingWSGIServer,
                         handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server.server_port, server
