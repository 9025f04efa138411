"""The swarm at a glance (coordinator/api/status.py): one document for /status.json, the page and
`coordinator status`, with the run's ETA, what bounds it, and every worker under its stage."""

from __future__ import annotations

import json

from coordinator.api.status import StatusBoard, format_status, swarm_status
from coordinator.api.status_page import STATUS_PAGE
from protos import swarmtrain_pb2 as pb

NOW = 1_800_000_000.0


def view() -> pb.GetSwarmResponse:
    return pb.GetSwarmResponse(
        run_id="tiny", config_hash="abc123", plan_version=3, generation=1,
        progress=pb.Progress(trained_tokens=250_000, total_tokens=1_000_000, last_loss=2.5, tokens_per_second=9_000,
                             expected_tokens_per_second=6_000, measured_tokens_per_second=5_000,
                             usd_per_hour=1.5, usd_spent=12.25, kwh_used=40.0,
                             traffic=[pb.TrafficCounter(kind=pb.TRAFFIC_KIND_ACTIVATIONS, sent_bytes=10)]),
        stages=[pb.StageInfo(stage_index=0, layer_start=0, layer_end=2, active_workers=2,
                             planned_tokens_per_second=12_000),
                pb.StageInfo(stage_index=1, layer_start=2, layer_end=4, active_workers=1,
                             planned_tokens_per_second=9_000)],
        workers=[pb.WorkerInfo(worker_id="w-a", public_name="alice", state=pb.WORKER_STATE_ACTIVE, stage_index=0,
                               gpu_name="NVIDIA GeForce RTX 3090", tokens_per_second=2_600, last_heartbeat_unix=NOW - 2,
                               tokens_total=100_000),
                 pb.WorkerInfo(worker_id="w-b", public_name="<b>bob</b>\x1b[2J", state=pb.WORKER_STATE_ACTIVE,
                               stage_index=0, tokens_per_second=2_400, last_heartbeat_unix=NOW - 1, tokens_total=50_000),
                 pb.WorkerInfo(worker_id="w-c", state=pb.WORKER_STATE_ACTIVE, stage_index=1, tokens_per_second=5_000,
                               last_heartbeat_unix=NOW - 1, tokens_total=150_000,
                               reachability=pb.REACHABILITY_UNREACHABLE),
                 pb.WorkerInfo(worker_id="w-d", public_name="alice", state=pb.WORKER_STATE_GONE, stage_index=-1,
                               last_heartbeat_unix=NOW - 60, tokens_total=100_000)],
        last_checkpoint=pb.CheckpointInfo(checkpoint_id=4, trained_tokens=200_000, size_bytes=1234),
    )


def test_the_status_says_how_far_how_fast_and_what_bounds_the_swarm() -> None:
    status = swarm_status(view(), NOW)
    p = status["progress"]
    assert p["fraction"] == 0.25 and p["eta_s"] == 750_000 / 5_000  # at the measured rate
    assert status["bound"]["stage"] == 1 and "layers 2-3 on 1 worker(s)" in status["bound"]["why"]
    assert [w["stage"] for w in status["workers"]] == [0, 0, 1, None]
    assert [w["state"] for w in status["workers"]] == ["active", "active", "active", "gone"]
    assert status["workers"][1]["gpu"] == "cpu" and status["checkpoint"]["id"] == 4
    assert p["traffic"] == {"activations": {"sent_bytes": 10, "received_bytes": 0}}
    before = pb.GetSwarmResponse(progress=pb.Progress(total_tokens=10))
    assert swarm_status(before, NOW)["progress"]["eta_s"] is None  # no rate yet: no ETA
    assert swarm_status(before, NOW)["bound"] is None and swarm_status(before, NOW)["checkpoint"] is None


def test_the_terminal_view_lists_every_worker_under_its_stage_and_shows_names_as_text() -> None:
    text = format_status(swarm_status(view(), NOW))
    lines = text.splitlines()
    assert lines[0] == "run tiny · plan 3 · generation 1 · config abc123"
    assert "ETA 2m30s" in lines[1] and "(25.0%)" in lines[1]
    assert lines[2] == "cost: $1.50/h now · $12.25 and 40.0 kWh so far"
    stage1 = lines.index(next(line for line in lines if line.startswith("stage 1 ")))
    assert "w-c" in lines[stage1 + 2] and " no (NAT) " in lines[stage1 + 2]  # the dial-back's verdict
    assert "reachable" in lines[stage1 + 1]
    assert any(line.startswith("no stage") for line in lines) and "w-d" in text
    assert "\x1b" not in text and "<b>bob</b>?[2J" in text  # a control sequence cannot reach the terminal


def test_the_board_serves_the_same_document_as_json() -> None:
    board = StatusBoard()
    board.publish(view(), NOW)
    assert json.loads(board.json) == {**json.loads(json.dumps(swarm_status(view(), NOW))), "events": []}


def test_the_page_needs_nothing_from_outside_and_writes_every_string_as_text() -> None:
    assert "http://" not in STATUS_PAGE and "https://" not in STATUS_PAGE  # no CDN: offline machines
    assert "innerHTML" not in STATUS_PAGE and "textContent" in STATUS_PAGE
    assert 'fetch("status.json"' in STATUS_PAGE


def test_the_leaderboard_sums_a_volunteers_workers_under_their_public_name() -> None:
    board = swarm_status(view(), NOW)["leaderboard"]
    assert [(e["name"], e["workers"], e["tokens"]) for e in board] == [
        ("alice", 2, 200_000), ("w-c", 1, 150_000), ("<b>bob</b>\x1b[2J", 1, 50_000)]
    assert [round(e["share"], 3) for e in board] == [0.5, 0.375, 0.125]
    text = format_status(swarm_status(view(), NOW))
    assert " 1. alice" in text and "50.0%" in text


def test_the_board_lists_what_happened_between_refreshes_newest_first() -> None:
    board = StatusBoard()
    first = view()
    board.publish(first, NOW)
    assert json.loads(board.json)["events"] == []  # nothing to compare with yet
    later = view()
    later.plan_version = 4
    later.planner_note = "re-planned: w-b left"
    later.workers[1].state = pb.WORKER_STATE_LEFT
    later.workers.add(worker_id="w-e", public_name="erin", state=pb.WORKER_STATE_ACTIVE, stage_index=1)
    later.last_checkpoint.checkpoint_id = 5
    later.progress.rollbacks = 1
    board.publish(later, NOW + 1)
    events = [e["what"] for e in json.loads(board.json)["events"]]
    assert events == list(reversed([
        "w-b (<b>bob</b>?[2J) is left (was active)", "w-e (erin) joined (cpu)", "plan 4: re-planned: w-b left",
        "checkpoint 5 complete at 200,000 tokens", "rolled back to a checkpoint (0 tokens undone in all)"]))
    board.publish(later, NOW + 2)
    assert len(json.loads(board.json)["events"]) == 5  # nothing new happened
