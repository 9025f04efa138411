"""The one-line summaries people read: the coordinator's swarm line and the worker's status line."""

from __future__ import annotations

import math

import pytest

from coordinator.swarm.stats import RATE_WINDOW_S, Throughput
from coordinator.swarm.summary import SwarmSnapshot, count_by_stage, summary_line
from protos import swarmtrain_pb2 as pb
from worker.app.status import status_line


def test_the_swarm_line_names_stages_rate_loss_progress_eta_and_money() -> None:
    line = summary_line(SwarmSnapshot(count_by_stage([0, 0, 1, 1]), 10_000.0, 400_000, 1_000_000, 2.3104, 1.2, 0.4))
    assert line == ("swarm · 4 workers (stage 0: 2, stage 1: 2) · 10,000 tok/s · loss 2.310 · 40.0% of 1,000,000 "
                    "tokens · eta 0:01:00 · $1.20/h, $0.40 spent")


def test_the_swarm_line_leaves_out_what_is_not_known_yet() -> None:
    line = summary_line(SwarmSnapshot({-1: 1}, 0.0, 0, 1_000_000, math.nan, 0.0, 0.0))
    assert line == "swarm · 1 worker (waiting: 1) · 0 tok/s · 0.0% of 1,000,000 tokens"


def test_the_worker_line_turns_counter_totals_into_rates() -> None:
    before = pb.Counters(tokens=1000, compute_seconds=1.0, wait_seconds=1.0,
                         traffic=[pb.TrafficCounter(kind=pb.TRAFFIC_KIND_ACTIVATIONS, sent_bytes=0)])
    now = pb.Counters(tokens=101_000, compute_seconds=7.0, wait_seconds=5.0, local_step=42,
                      traffic=[pb.TrafficCounter(kind=pb.TRAFFIC_KIND_ACTIVATIONS, sent_bytes=20_000_000,
                                                 received_bytes=5_000_000),
                               pb.TrafficCounter(kind=pb.TRAFFIC_KIND_GRADIENTS, received_bytes=5_000_000)])
    line = status_line(1, before, now, 10.0, 2.5, 0.45)
    assert line == ("stage 1 · 10,000 tok/s · loss 2.500 · sent 2.0 MB/s · received 1.0 MB/s · compute 60% · "
                    "step 42 · $0.45/h")
    assert status_line(-1, before, now, 10.0, math.nan, 0.0) == "status: waiting for a stage"
    assert "loss" not in status_line(0, before, now, 10.0, math.nan, 0.0)


def test_the_swarm_rate_is_recent_and_falls_to_zero_once_nothing_trains() -> None:
    rates, tokens = Throughput(), 0
    for second in range(120):  # 1,000 tokens/s for two minutes, sampled once a second
        tokens = 1_000 * second
        rates.sample(float(second), tokens)
    assert rates.rate(119.0, tokens) == pytest.approx(1_000, rel=0.02)
    for second in range(120, 120 + int(RATE_WINDOW_S) + 2):  # then nothing trains
        rates.sample(float(second), tokens)
    assert rates.rate(float(second), tokens) == 0.0


def test_the_worker_line_says_0_tok_s_when_nothing_trained_since_the_last_line() -> None:
    totals = pb.Counters(tokens=50_000, compute_seconds=3.0, wait_seconds=1.0, local_step=7)
    assert status_line(0, totals, totals, 10.0, 2.5, 0.0).startswith("stage 0 · 0 tok/s · ")
