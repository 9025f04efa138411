"""A volunteer's own view on the worker's metrics port: what it does, why it waits, what it gave."""

from __future__ import annotations

import json
import urllib.request

import torch

from protos import swarmtrain_pb2 as pb
from worker.app.metrics import WorkerState, serve_worker_metrics
from worker.app.own_status import volunteer_status
from worker.telemetry.counters import CounterBook


def test_the_view_counts_what_the_heartbeats_count() -> None:
    totals = pb.Counters(tokens=20_480, samples=160, compute_seconds=7_200, wait_seconds=1_800, local_step=10,
                         traffic=[pb.TrafficCounter(kind=pb.TRAFFIC_KIND_ACTIVATIONS, sent_bytes=5, received_bytes=7)])
    status = volunteer_status(totals, worker_id="w-1", public_name="alice", stage=1, waiting="", gpu="RTX 3090",
                              board_watts=350.0, usd_per_hour=0.3, started_unix=1000.0, now=4600.0)
    c = status["contributed"]
    assert status["doing"] == "training stage 1" and status["uptime_s"] == 3600.0
    assert (c["tokens"], c["optimizer_steps"], c["compute_hours"], c["waiting_hours"]) == (20_480, 10, 2.0, 0.5)
    assert c["kwh_estimated"] == 0.7 and (c["sent_bytes"], c["received_bytes"]) == (5, 7)
    waiting = volunteer_status(pb.Counters(), worker_id="w-1", public_name="", stage=-1,
                               waiting="the fleet cannot hold the model yet", gpu="", board_watts=0.0,
                               usd_per_hour=0.0, started_unix=0.0, now=1.0)
    assert waiting["doing"] == "waiting: the fleet cannot hold the model yet" and waiting["gpu"] == "cpu"


def test_the_metrics_port_serves_the_page_its_json_and_still_the_metrics() -> None:
    counters = CounterBook()
    counters.add_work(tokens=4_096, samples=32, compute_s=3.0, wait_s=1.0)
    state = WorkerState(torch.device("cpu"), public_name="alice", worker_id="w-1", stage=0)
    port, server = serve_worker_metrics(counters, state, "127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{port}"
        status = json.loads(urllib.request.urlopen(base + "/status.json", timeout=10).read())
        assert status["contributed"]["tokens"] == 4_096 and status["doing"] == "training stage 0"
        page = urllib.request.urlopen(base + "/status", timeout=10).read().decode()
        assert "<title>swarmtrain worker</title>" in page and "innerHTML" not in page and "http" not in page
        metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
        assert "swarmtrain_worker_tokens_total 4096.0" in metrics
    finally:
        server.shutdown()
        server.server_close()
