"""The pure parts of the worker's control-plane client: counters, backoff, run choice, errors."""

from __future__ import annotations

import random
import threading

import grpc
import pytest

from protos import swarmtrain_pb2 as pb
from protos.rendezvous import RendezvousRecord, records_from_entry
from worker.app.control_client import assignment_changed, backoff_cap, backoff_delay, lease_s_of
from worker.app.descriptions import assigned_event, describe_assignment
from worker.app.discovery import choose_run
from worker.app.rpc_errors import USER_MISTAKE, CoordinatorError, explain_rpc_error
from worker.telemetry.counters import CounterBook

PEERS = ["/ip4/127.0.0.1/tcp/1/p2p/QmPeer"]


def record(endpoint: str = "127.0.0.1:50500") -> RendezvousRecord:
    return RendezvousRecord(endpoint, "abc", "0.1.0", False)


# ---- CounterBook ------------------------------------------------------------------------


def test_take_delta_returns_and_resets() -> None:
    book = CounterBook()
    book.add_work(tokens=100, samples=2, compute_s=0.5, wait_s=0.1)
    book.add_work(tokens=50, samples=1)
    book.add_loss(2.5)
    book.add_traffic(pb.TRAFFIC_KIND_ACTIVATIONS, sent=10, received=20, uncompressed=40)
    book.add_traffic(pb.TRAFFIC_KIND_ACTIVATIONS, sent=1)
    book.set_local_step(7)
    delta = book.take_delta()
    assert (delta.tokens, delta.samples, delta.loss_count, delta.local_step) == (150, 3, 1, 7)
    assert delta.loss_sum == pytest.approx(2.5) and delta.compute_seconds == pytest.approx(0.5)
    assert [(t.kind, t.sent_bytes, t.received_bytes, t.uncompressed_bytes) for t in delta.traffic] == [
        (pb.TRAFFIC_KIND_ACTIVATIONS, 11, 20, 40)
    ]
    empty = book.take_delta()
    assert (empty.tokens, empty.loss_count, len(empty.traffic)) == (0, 0, 0)
    assert empty.local_step == 7  # absolute, not a delta


def test_an_unsent_delta_is_put_back_not_lost() -> None:
    book = CounterBook()
    book.add_work(tokens=100, samples=1)
    book.add_traffic(pb.TRAFFIC_KIND_GRADIENTS, sent=5)
    lost = book.take_delta()
    book.add_work(tokens=7, samples=1)  # work done while the heartbeat was failing
    book.restore(lost)
    again = book.take_delta()
    assert (again.tokens, again.samples) == (107, 2)
    assert [(t.kind, t.sent_bytes) for t in again.traffic] == [(pb.TRAFFIC_KIND_GRADIENTS, 5)]


def test_counter_book_is_thread_safe() -> None:
    book = CounterBook()
    taken: list[int] = []

    def produce() -> None:
        for _ in range(2000):
            book.add_work(tokens=1, samples=1)

    threads = [threading.Thread(target=produce) for _ in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        taken.append(book.take_delta().tokens)
    for t in threads:
        t.join()
    taken.append(book.take_delta().tokens)
    assert sum(taken) == 8000


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_a_bad_loss_is_refused_before_it_reaches_the_coordinator(bad: float) -> None:
    with pytest.raises(ValueError):
        CounterBook().add_loss(bad)


def test_negative_work_and_unknown_traffic_are_refused() -> None:
    book = CounterBook()
    with pytest.raises(ValueError):
        book.add_work(tokens=-1)
    with pytest.raises(ValueError):
        book.add_traffic(pb.TRAFFIC_KIND_UNSPECIFIED, sent=1)


# ---- backoff ----------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    no_jitter = [backoff_delay(n, 0.5, 8.0, 0.999999) for n in range(8)]
    assert no_jitter == pytest.approx([0.5, 1, 2, 4, 8, 8, 8, 8], rel=1e-5)
    rng = random.Random(0)
    for attempt in range(40):
        delay = backoff_delay(attempt, 0.5, 8.0, rng.random())
        ceiling = min(8.0, 0.5 * 2**attempt)
        assert ceiling / 2 <= delay < ceiling + 1e-9
    assert backoff_delay(10_000, 1.0, 30.0, 0.0) == 15.0  # huge attempt counts do not overflow


def test_backoff_cap_follows_the_heartbeat_interval_within_bounds() -> None:
    assert backoff_cap(0.2) == pytest.approx(1.2)
    assert backoff_cap(0.01) == 1.0
    assert backoff_cap(5.0) == 30.0
    assert backoff_cap(60.0) == 30.0


# ---- choosing a run ---------------------------------------------------------------------


def test_the_only_run_is_chosen_without_run_id() -> None:
    assert choose_run({"tiny": record()}, None, PEERS) == ("tiny", record())


def test_several_runs_need_run_id_and_are_listed() -> None:
    found = {"a": record("10.0.0.1:1"), "b": record("10.0.0.2:2")}
    with pytest.raises(CoordinatorError) as caught:
        choose_run(found, None, PEERS)
    message = str(caught.value)
    assert "a at 10.0.0.1:1" in message and "b at 10.0.0.2:2" in message and "--run-id" in message
    assert caught.value.exit_code == USER_MISTAKE
    assert choose_run(found, "b", PEERS)[1].endpoint == "10.0.0.2:2"


def test_nothing_found_and_unknown_run_id_say_what_to_do() -> None:
    with pytest.raises(CoordinatorError, match="no coordinator found through --peers .*--coordinator"):
        choose_run({}, None, PEERS)
    with pytest.raises(CoordinatorError, match="run 'c'.*it lists: a.*check --run-id"):
        choose_run({"a": record()}, "c", PEERS)


def test_records_are_read_from_subkeys_and_junk_is_skipped() -> None:
    class Item:
        def __init__(self, value: object) -> None:
            self.value = value

    good = record().to_value()
    entry = Item({"tiny": Item(good), "junk": Item({"endpoint": "x"}), 7: Item(good)})
    assert records_from_entry(entry) == {"tiny": record()}
    assert records_from_entry(None) == {}
    assert records_from_entry(Item(b"plain value")) == {}


# ---- errors, assignments ----------------------------------------------------------------


def test_rpc_errors_become_one_actionable_line() -> None:
    refusal = "a wrong join token: this swarm admits workers started with --join-token <token>"
    token = explain_rpc_error("Join", grpc.StatusCode.UNAUTHENTICATED, refusal, "h:1")
    assert str(token).startswith("the coordinator refused the join token: pass --join-token")
    assert token.exit_code == USER_MISTAKE
    missing = explain_rpc_error("Join", grpc.StatusCode.UNAUTHENTICATED, "no join token: ...", "h:1")
    assert str(missing).startswith("the coordinator requires the join token")
    skew = "worker runs swarmtrain 0.2.0, this swarm runs 0.1.0: install swarmtrain 0.1.x and rejoin"
    version = explain_rpc_error("Join", grpc.StatusCode.FAILED_PRECONDITION, skew, "h:1")
    assert str(version).startswith("worker runs swarmtrain 0.2.0") and version.exit_code == USER_MISTAKE
    down = explain_rpc_error("Join", grpc.StatusCode.UNAVAILABLE, "failed to connect\nmore detail", "h:1")
    assert str(down).startswith("cannot reach the coordinator at h:1 (failed to connect)")
    assert down.exit_code != USER_MISTAKE
    for err in (token, missing, version, down):
        assert "\n" not in str(err)


def test_a_ban_or_a_revoked_token_is_one_line_that_keeps_the_coordinators_reason() -> None:
    ban = explain_rpc_error("Heartbeat", grpc.StatusCode.PERMISSION_DENIED,
                            "worker w-0123456789ab was banned after 5 outlier reports from 1 peer", "h:1")
    assert str(ban) == "worker w-0123456789ab was banned after 5 outlier reports from 1 peer"
    revoked = explain_rpc_error("Join", grpc.StatusCode.UNAUTHENTICATED,
                                "join token ops-1 was revoked: ask the swarm's operator for a new one", "h:1")
    assert str(revoked) == ("the coordinator refused the join token: "
                            "join token ops-1 was revoked: ask the swarm's operator for a new one")
    # exit 2: a service manager must not restart into the same refusal
    assert ban.exit_code == revoked.exit_code == USER_MISTAKE


def test_a_renewed_lease_is_not_a_new_assignment() -> None:
    a = pb.Assignment(plan_version=3, stage_index=1, num_stages=2, layer_start=2, layer_end=4,
                      lease_expires_unix=10)
    b = pb.Assignment()
    b.CopyFrom(a)
    b.lease_expires_unix = 99
    assert assignment_changed(None, a)
    assert not assignment_changed(a, b)
    b.plan_version = 4
    assert assignment_changed(a, b)


def test_lease_is_read_from_the_run_config_json() -> None:
    assert lease_s_of('{"coordinator": {"lease_s": 12.5}}') == 12.5
    assert lease_s_of("not json") == 300.0


def test_assignment_reads_as_one_line() -> None:
    a = pb.Assignment(
        stage_index=1, num_stages=2, layer_start=2, layer_end=4, sync_period_steps=4,
        activation_compression=pb.CompressionSpec(codec=pb.CODEC_BLOCKWISE_8BIT),
        sync_compression=pb.CompressionSpec(codec=pb.CODEC_FLOAT16),
    )
    assert describe_assignment(a, "w-1a2b3c", 4) == (
        "assigned: stage 1 of 2 · layers 2–3 of 4 · activations blockwise_8bit · sync float16 every 4 steps"
        " · worker w-1a2b3c"
    )
    a.stage_index, a.layer_start, a.layer_end, a.data_shard_index, a.data_shard_count = 0, 0, 1, 0, 2
    assert "· layer 0 of 4 ·" in describe_assignment(a, "w-1", 4)
    assert "· data shard 0/2 ·" in describe_assignment(a, "w-1", 4)
    a.overlap_steps = True  # only the first stage drives, so only it overlaps its steps
    assert "· activations blockwise_8bit, steps overlapped ·" in describe_assignment(a, "w-1", 4)
    a.stage_index = 1
    assert "overlapped" not in describe_assignment(a, "w-1", 4)


def test_the_assigned_event_says_what_the_line_says_for_programs() -> None:
    a = pb.Assignment(plan_version=7, stage_index=1, num_stages=2, layer_start=2, layer_end=4)
    assert assigned_event(a, "w-1a2b3c") == {"worker_id": "w-1a2b3c", "stage": 1, "num_stages": 2,
                                             "layers": [2, 4], "plan_version": 7}


def test_peer_reports_add_up_per_peer_and_reason_and_stay_bounded() -> None:
    from worker.pipeline.stage_server import refusal_reason

    book = CounterBook()
    for _ in range(3):
        book.report_peer("A", "non_finite")
    book.report_peer("B", "unauthorized")
    delta = book.take_delta()
    assert sorted((r.peer_id, r.reason, r.count) for r in delta.reports) == [("A", "non_finite", 3),
                                                                             ("B", "unauthorized", 1)]
    for i in range(100):
        book.report_peer(str(i), "malformed")
    assert len(book.take_delta().reports) == 64  # what one heartbeat may carry
    assert refusal_reason("bad_request", "tensor (2, 3) holds NaN or infinite values") == "non_finite"
    assert refusal_reason("unauthorized", "peer X is not an admitted worker") == "unauthorized"
    assert refusal_reason("outlier", "refused the round's outcome: it moves the stage ...") == "outlier"
    assert refusal_reason("bad_request", "targets must be int64") == "malformed"
