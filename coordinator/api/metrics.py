"""Prometheus metrics of the coordinator, read from the swarm at scrape time, and service discovery.

One custom collector owns every metric, so nothing has to be kept in step by hand and
tests can scrape their own CollectorRegistry. The same HTTP server answers `/sd` with
Prometheus HTTP service discovery for the live workers' own /metrics endpoints, so one
scrape config follows the swarm as volunteers come and go.
"""

from __future__ import annotations

import json
import math
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from configs.profile import train_flops_per_token
from configs.version import SOFTWARE_VERSION
from coordinator.api.data_files import DATA_PATH, data_files
from coordinator.api.status import REACHABILITY, StatusBoard
from coordinator.api.status_page import STATUS_PAGE
from coordinator.api.validation import REPORT_REASONS
from coordinator.costs.meter import DATACENTER_MFU, SECONDS_PER_HOUR, datacenter_usd
from coordinator.storage.registry import BANNED
from coordinator.swarm.forecast import expected_rate
from coordinator.swarm.orchestrator import Swarm
from coordinator.swarm.rollback import REASONS as ROLLBACK_REASONS
from protos import swarmtrain_pb2 as pb

TRAFFIC_KINDS = (pb.TRAFFIC_KIND_ACTIVATIONS, pb.TRAFFIC_KIND_GRADIENTS, pb.TRAFFIC_KIND_STATE)


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

        progress, generation = swarm.registry.progress, swarm.ledger.generation
        # a counter never goes down: it counts the tokens rollbacks undid too; the model's own
        # position is swarmtrain_model_tokens
        yield CounterMetricFamily("swarmtrain_trained_tokens", "Tokens trained through the last stage, "
                                  "including those a rollback undid", value=progress.trained_tokens
                                  + generation.rolled_back_tokens)
        yield GaugeMetricFamily("swarmtrain_model_tokens", "Trained tokens the model holds now (moves back on "
                                "a rollback)", value=progress.trained_tokens)
        rollbacks = CounterMetricFamily("swarmtrain_rollbacks", "Times the whole swarm went back to its newest "
                                        "checkpoint or the seed, by reason", labels=["reason"])
        for reason in ROLLBACK_REASONS:
            rollbacks.add_metric([reason], generation.rollbacks.get(reason, 0))
        yield rollbacks
        yield CounterMetricFamily("swarmtrain_rolled_back_tokens", "Trained tokens rollbacks undid",
                                  value=generation.rolled_back_tokens)
        reachability = GaugeMetricFamily("swarmtrain_worker_reachability", "Active workers by whether the "
                                         "coordinator could connect to their data plane", labels=["reachability"])
        seen = Counter(REACHABILITY.get(swarm.reachability.get(r.worker_id, 0), "unknown")
                       for r in swarm.registry.active())
        for name in ("unknown", *REACHABILITY.values()):
            reachability.add_metric([name], seen.get(name, 0))
        yield reachability
        ledger = swarm.data.ledger
        if ledger is not None:  # prepared data: how far into which epoch the coordinator has handed it out
            yield GaugeMetricFamily("swarmtrain_data_epoch", "The epoch of prepared data being handed out",
                                    value=ledger.epoch)
            yield GaugeMetricFamily("swarmtrain_data_epoch_handed_out", "Share of the epoch's sequences "
                                    "handed to stage 0 so far", value=ledger.cursor / ledger.positions)
        loss = progress.last_loss if progress.loss_count else math.nan
        yield GaugeMetricFamily("swarmtrain_training_loss", "Latest mean training loss", value=loss)
        yield GaugeMetricFamily("swarmtrain_banned_workers", "Workers banned after repeated reports from their peers",
                                value=sum(n for (_, state), n in counts.items() if state == BANNED))
        tokens = GaugeMetricFamily("swarmtrain_join_tokens", "Operator-issued join tokens, by state", labels=["state"])
        issued = list(swarm.tokens.values())
        tokens.add_metric(["active"], sum(1 for t in issued if not t.revoked))
        tokens.add_metric(["revoked"], sum(1 for t in issued if t.revoked))
        yield tokens
        yield GaugeMetricFamily("swarmtrain_plan_version", "Version of the current plan", value=swarm.plan_version)
        yield GaugeMetricFamily("swarmtrain_run_complete",
                                "1 once the token budget is trained and its final checkpoint complete",
                                value=int(swarm.final_checkpoint() is not None))
        latest = swarm.checkpoints.latest
        yield GaugeMetricFamily("swarmtrain_checkpoint_last_id", "Id of the newest complete checkpoint (0: none)",
                                value=latest.checkpoint_id if latest else 0)
        yield GaugeMetricFamily("swarmtrain_checkpoint_last_completed_timestamp_seconds",
                                "When the newest complete checkpoint was completed (Unix time; NaN: none)",
                                value=latest.completed_unix or math.nan if latest else math.nan)
        yield GaugeMetricFamily("swarmtrain_checkpoint_last_bytes", "Size of the newest complete checkpoint",
                                value=latest.size_bytes if latest else 0)
        yield GaugeMetricFamily("swarmtrain_planned_tokens_per_second",
                                "The plan's expected swarm throughput (slowest stage)", value=swarm.swarm_rate())
        yield GaugeMetricFamily("swarmtrain_expected_tokens_per_second",
                                "What the rate model predicts the live swarm trains: the live workers at their "
                                "measured rates, with the pipeline's fill and drain", value=expected_rate(swarm))
        worked = progress.trained_tokens + generation.rolled_back_tokens  # what the fleet computed and paid for
        yield from self._compute_and_traffic(worked)
        yield from self._cost(worked)

    def _compute_and_traffic(self, trained_tokens: int) -> Iterator[object]:
        swarm = self.swarm
        model_flops = train_flops_per_token(swarm.profile.total.params) * trained_tokens
        yield CounterMetricFamily("swarmtrain_model_flops", "Training FLOPs of the trained tokens (6 x parameters "
                                  "per token)", value=model_flops)
        yield GaugeMetricFamily("swarmtrain_peak_flops", "Sum of the live workers' peak FLOP/s at the run's "
                                "precision (MFU = rate(swarmtrain_model_flops_total) / this)",
                                value=swarm.live_rates().peak_flops)
        sent = CounterMetricFamily("swarmtrain_network_sent_bytes", "Bytes workers sent, by kind", labels=["kind"])
        received = CounterMetricFamily("swarmtrain_network_received_bytes", "Bytes workers received, by kind",
                                       labels=["kind"])
        raw = CounterMetricFamily("swarmtrain_network_uncompressed_bytes",
                                  "What the sent bytes would have been uncompressed, by kind", labels=["kind"])
        ratio = GaugeMetricFamily("swarmtrain_compression_ratio", "Uncompressed over sent bytes so far, by kind",
                                  labels=["kind"])
        for kind in TRAFFIC_KINDS:  # every kind, 0 until seen, so queries and dashboards find them
            total = swarm.traffic.get(kind)
            name = pb.TrafficKind.Name(kind).removeprefix("TRAFFIC_KIND_").lower()
            sent.add_metric([name], total.sent_bytes if total else 0)
            received.add_metric([name], total.received_bytes if total else 0)
            raw.add_metric([name], total.uncompressed_bytes if total else 0)
            ratio.add_metric([name], total.uncompressed_bytes / total.sent_bytes
                             if total and total.sent_bytes and total.uncompressed_bytes else math.nan)
        yield from (sent, received, raw, ratio)
        reports = CounterMetricFamily("swarmtrain_peer_reports", "Messages workers refused from other peers, by "
                                      "reason", labels=["reason"])
        for reason in REPORT_REASONS:
            reports.add_metric([reason], swarm.reports.by_reason.get(reason, 0))
        yield reports

    def _cost(self, trained_tokens: int) -> Iterator[object]:
        swarm = self.swarm
        swarm.accrue_cost()
        meter, config = swarm.cost, swarm.config
        yield GaugeMetricFamily("swarmtrain_cost_usd_per_hour", "What the live workers cost per hour",
                                value=meter.rates.usd_per_hour)
        yield CounterMetricFamily("swarmtrain_cost_usd", "Dollars the swarm has cost since this coordinator "
                                  "started (GPU-hours x price)", value=meter.usd)
        yield GaugeMetricFamily("swarmtrain_power_watts", "Board power of the live workers' GPUs",
                                value=meter.rates.watts)
        yield CounterMetricFamily("swarmtrain_energy_joules", "Energy the live workers' GPUs drew at board power",
                                  value=meter.joules)
        yield CounterMetricFamily("swarmtrain_energy_cost_usd", "That energy at metrics.energy_usd_per_kwh",
                                  value=meter.energy_usd)
        per_million = meter.usd / trained_tokens * 1e6 if trained_tokens else math.nan
        yield GaugeMetricFamily("swarmtrain_cost_usd_per_million_tokens", "Dollars spent per million tokens "
                                "trained", value=per_million)
        rate = swarm.measured_tokens_per_second()
        left = max(0, config.training.total_tokens - trained_tokens)
        seconds_left = left / rate if rate > 0 else math.nan
        yield GaugeMetricFamily("swarmtrain_projected_remaining_seconds", "Time to finish the token budget at the "
                                "measured throughput", value=seconds_left)
        yield GaugeMetricFamily("swarmtrain_projected_remaining_cost_usd", "Dollars to finish the token budget at "
                                "the live $/hour", value=seconds_left * meter.rates.usd_per_hour / SECONDS_PER_HOUR)
        reference = swarm.catalog.get(config.metrics.datacenter_reference_gpu)
        model_flops = train_flops_per_token(swarm.profile.total.params) * trained_tokens
        yield CounterMetricFamily(
            "swarmtrain_datacenter_cost_usd",
            f"What the same progress costs on rented {reference.id} at {DATACENTER_MFU:.0%} of peak",
            value=datacenter_usd(model_flops, reference.peak(config.training.precision), reference.usd_per_hour,
                                 DATACENTER_MFU))


def scrape_targets(swarm: Swarm) -> list[dict[str, object]]:
    """Prometheus HTTP service discovery: one target group per active worker that serves /metrics.

    A worker listening on every interface (0.0.0.0 or ::) is reached at the address its
    gRPC calls came from. Labels name the worker on its own series; the coordinator's own
    series never carry a per-worker label.
    """
    groups = []
    for record in sorted(swarm.registry.active(), key=lambda r: r.worker_id):
        profile = swarm.worker_profile(record)
        if not profile.metrics_endpoint:
            continue
        host, _, port = profile.metrics_endpoint.rpartition(":")
        if host in ("0.0.0.0", "[::]", "::", ""):
            host = _peer_host(record.address)
            if not host:
                continue
        labels = {"run_id": swarm.config.coordinator.run_id, "worker_id": record.worker_id,
                  "stage": str(record.stage_index)}
        if profile.public_name:
            labels["public_name"] = profile.public_name
        groups.append({"targets": [f"{host}:{port}"], "labels": labels})
    return groups


def _peer_host(address: str) -> str:
    """The host of a gRPC peer string ('ipv4:1.2.3.4:5678', 'ipv6:[::1]:5678'), or ''."""
    kind, _, rest = address.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return ""
    host = rest.rpartition(":")[0]
    return host if host else ""


SD_PATH = "/sd"


def metrics_app(swarm: Swarm, registry: CollectorRegistry,
                board: StatusBoard | None = None) -> Callable[..., Iterable[bytes]]:
    """A WSGI app: Prometheus exposition at /metrics (and /), HTTP service discovery at /sd, the
    prepared data's files at /data/ (coordinator/api/data_files.py), and with a board the swarm
    page at /status and its data at /status.json."""
    exposition = make_wsgi_app(registry)
    files = data_files(swarm.config.data.prepared)

    def reply(start_response: Callable[..., Any], body: bytes, kind: str) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", kind), ("Content-Length", str(len(body))),
                                  ("Cache-Control", "no-store")])
        return [body]

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO")
        if files is not None and str(path).startswith(DATA_PATH):
            return files(environ, start_response)
        if path == SD_PATH:
            return reply(start_response, json.dumps(scrape_targets(swarm)).encode(), "application/json")
        if board is not None and path == "/status.json":
            return reply(start_response, board.json, "application/json")
        if board is not None and path == "/status":
            return reply(start_response, STATUS_PAGE.encode(), "text/html; charset=utf-8")
        return exposition(environ, start_response)

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the coordinator's terminal."""


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def serve_metrics(swarm: Swarm, host: str, port: int,
                  board: StatusBoard | None = None) -> tuple[CollectorRegistry, int, object]:
    """Start the /metrics, /sd (and /status) HTTP server in a thread; returns the registry, the bound
    port and the server."""
    registry = CollectorRegistry()
    registry.register(SwarmCollector(swarm))
    server = make_server(host, port, metrics_app(swarm, registry, board), _ThreadingWSGIServer,
                         handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return registry, server.server_port, server
