"""The live swarm's cost: rates from profiles and the catalog, integrated over time, and what the coordinator exports."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from configs.catalog import load_catalog
from coordinator.api.metrics import SwarmCollector, scrape_targets
from coordinator.costs.meter import CostMeter, SwarmRates, WorkerRates, datacenter_usd, worker_rates
from protos import swarmtrain_pb2 as pb
from tests.harness.swarm_state import Clock, make_swarm, profile

CATALOG = load_catalog()


def test_a_catalog_gpu_is_priced_and_powered_from_the_catalog_unless_the_worker_declares_a_price() -> None:
    spec = CATALOG.get("RTX-3090")
    card = pb.WorkerProfile(gpu_name="NVIDIA GeForce RTX 3090", gpu_count=1, peak_flops=71e12)
    assert worker_rates(card, CATALOG) == WorkerRates(spec.usd_per_hour, spec.board_power_watts, 71e12)
    card.usd_per_hour = 0.05
    assert worker_rates(card, CATALOG).usd_per_hour == 0.05
    two = pb.WorkerProfile(gpu_name="NVIDIA GeForce RTX 3090", gpu_count=2, peak_flops=142e12)
    assert worker_rates(two, CATALOG).watts == 2 * spec.board_power_watts


def test_a_cpu_or_unknown_gpu_costs_nothing_and_counts_its_measured_rate() -> None:
    cpu = pb.WorkerProfile(achieved_flops=2e10)
    assert worker_rates(cpu, CATALOG) == WorkerRates(0.0, 0.0, 2e10)
    odd = pb.WorkerProfile(gpu_name="Imaginary GPU 9000", gpu_count=1, peak_flops=1e12)
    assert worker_rates(odd, CATALOG) == WorkerRates(0.0, 0.0, 1e12)


def test_the_meter_bills_each_interval_at_the_rates_seen_at_its_end() -> None:
    meter = CostMeter(energy_usd_per_kwh=0.25)
    meter.accrue(100.0, SwarmRates(usd_per_hour=3.6, watts=1000.0, peak_flops=1.0))  # starts the clock
    assert meter.usd == 0.0 and meter.joules == 0.0
    meter.accrue(200.0, SwarmRates(usd_per_hour=3.6, watts=1000.0))  # 100 s at $3.6/h and 1 kW
    assert meter.usd == pytest.approx(0.1) and meter.joules == pytest.approx(100_000.0)
    meter.accrue(150.0, SwarmRates(usd_per_hour=99.0))  # a clock that went back bills nothing
    assert meter.usd == pytest.approx(0.1)
    meter.accrue(3800.0, SwarmRates(watts=1000.0))  # 1 h more at 1 kW: 1 kWh at $0.25
    assert meter.energy_usd == pytest.approx((100_000 + 3_600_000) / 3.6e6 * 0.25)


def test_datacenter_cost_is_flops_over_achieved_rate_times_price() -> None:
    # 312 TFLOP/s at 40% for one hour is 4.4928e17 FLOPs: one GPU-hour
    assert datacenter_usd(312e12 * 0.4 * 3600, 312e12, 1.79, 0.4) == pytest.approx(1.79)
    assert datacenter_usd(1e18, 0.0, 1.79, 0.4) == 0.0


def scrape(swarm) -> dict[str, list]:
    registry = CollectorRegistry()
    registry.register(SwarmCollector(swarm))
    return {family.name: family.samples for family in text_string_to_metric_families(generate_latest(registry).decode())}


def test_the_coordinator_exports_cost_compute_and_traffic_of_the_live_swarm(tmp_path: Path) -> None:
    clock = Clock()
    swarm = make_swarm(tmp_path, clock)
    cards = []
    for _ in range(2):
        card = profile(memory=40 * 2**20)  # a GPU's peak for tiny is smaller than a CPU's: 40 MiB splits it
        card.gpu_name, card.gpu_count, card.peak_flops = "NVIDIA GeForce RTX 3090", 1, 71e12
        record, token = swarm.join(pb.JoinRequest(profile=card), "ipv4:10.0.0.7:4242")
        cards.append((record.worker_id, token))
    for _ in range(720):  # an hour of two 3090s, heartbeating every 5 s
        clock.now += 5
        for worker_id, token in cards:
            swarm.heartbeat(pb.HeartbeatRequest(worker_id=worker_id, session_token=token, plan_version=1 << 40))
        swarm.sweep()
    worker_id, token = next((w, t) for w, t in cards if swarm.registry.workers[w].stage_index == 1)
    swarm.heartbeat(pb.HeartbeatRequest(worker_id=worker_id, session_token=token, plan_version=1 << 40,
                                        counters=pb.Counters(tokens=1_000_000, loss_sum=2.0, loss_count=1,
                                                             traffic=[pb.TrafficCounter(
                                                                 kind=pb.TRAFFIC_KIND_ACTIVATIONS, sent_bytes=50,
                                                                 uncompressed_bytes=200)])))
    metrics = scrape(swarm)
    value = {name: samples[0].value for name, samples in metrics.items() if len(samples) == 1}
    price = CATALOG.get("RTX-3090").usd_per_hour
    assert value["swarmtrain_cost_usd_per_hour"] == pytest.approx(2 * price)
    assert value["swarmtrain_cost_usd"] == pytest.approx(2 * price)  # counters lose "_total" in the family name
    assert value["swarmtrain_energy_joules"] == pytest.approx(2 * 350 * 3600)
    assert value["swarmtrain_peak_flops"] == pytest.approx(142e12)
    assert value["swarmtrain_cost_usd_per_million_tokens"] == pytest.approx(2 * price)
    params = swarm.profile.total.params
    assert value["swarmtrain_model_flops"] == pytest.approx(6 * params * 1_000_000)
    ratio = {s.labels["kind"]: s.value for s in metrics["swarmtrain_compression_ratio"]}
    assert ratio["activations"] == pytest.approx(4.0) and math.isnan(ratio["state"])
    sent = {s.labels["kind"]: s.value for s in metrics["swarmtrain_network_sent_bytes"]}
    assert sent == {"activations": 50.0, "gradients": 0.0, "state": 0.0}
    # two stages of one card each, two micro-batches a step: the forecast keeps less than the
    # slowest stage's rate (each step fills and drains the pipeline)
    planned, expected = value["swarmtrain_planned_tokens_per_second"], value["swarmtrain_expected_tokens_per_second"]
    assert 0 < expected < planned


def test_service_discovery_lists_active_workers_that_serve_metrics(tmp_path: Path) -> None:
    swarm = make_swarm(tmp_path, Clock())
    listed, wildcard, silent = profile(), profile(), profile()
    listed.metrics_endpoint, listed.public_name = "192.0.2.5:9600", "alice"
    wildcard.metrics_endpoint = "0.0.0.0:9601"  # listens everywhere: reached where its calls came from
    joined = [swarm.join(pb.JoinRequest(profile=p), "ipv4:198.51.100.9:5000") for p in (listed, wildcard, silent)]
    groups = scrape_targets(swarm)
    by_target = {g["targets"][0]: g["labels"] for g in groups}
    assert sorted(by_target) == ["192.0.2.5:9600", "198.51.100.9:9601"]
    assert by_target["192.0.2.5:9600"]["public_name"] == "alice"
    assert by_target["192.0.2.5:9600"]["worker_id"] == joined[0][0].worker_id
    assert {labels["run_id"] for labels in by_target.values()} == {"tiny"}
    swarm.leave(pb.LeaveRequest(worker_id=joined[0][0].worker_id, session_token=joined[0][1]))
    assert [g["targets"] for g in scrape_targets(swarm)] == [["198.51.100.9:9601"]]  # gone from the list


def test_refused_peers_reported_in_heartbeats_are_counted_by_reason(tmp_path: Path) -> None:
    from coordinator.api.validation import InvalidRequest, validate_counters

    swarm = make_swarm(tmp_path, Clock())
    joined = swarm.join(pb.JoinRequest(profile=profile()), "ipv4:10.0.0.2:1")
    reports = [pb.PeerReport(peer_id="12D3KooWbad", reason="non_finite", count=3),
               pb.PeerReport(peer_id="12D3KooWodd", reason="unauthorized", count=1)]
    counters = pb.Counters(reports=reports)
    validate_counters(counters)
    swarm.heartbeat(pb.HeartbeatRequest(worker_id=joined[0].worker_id, session_token=joined[1],
                                        plan_version=1 << 40, counters=counters))
    by_reason = {s.labels["reason"]: s.value for s in scrape(swarm)["swarmtrain_peer_reports"]}
    assert by_reason == {"non_finite": 3.0, "malformed": 0.0, "unauthorized": 1.0, "outlier": 0.0}
    assert swarm.reports.by_peer == {"12D3KooWbad": 3, "12D3KooWodd": 1}
    for bad in (pb.PeerReport(peer_id="p", reason="because", count=1), pb.PeerReport(peer_id="p", reason="outlier"),
                pb.PeerReport(reason="outlier", count=1)):
        with pytest.raises(InvalidRequest):
            validate_counters(pb.Counters(reports=[bad]))
    with pytest.raises(InvalidRequest, match="at most 64"):
        validate_counters(pb.Counters(reports=[pb.PeerReport(peer_id=str(i), reason="malformed", count=1)
                                               for i in range(65)]))
