"""The coordinator's data ledger (each position of an epoch handed out once, taken back from
replicas that leave) in real SQLite, and the worker's side of it (worker/data/leases.py)."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.storage.data_ranges import DataRange, DataRangeStore
from coordinator.swarm.data_ledger import HELD_RANGES, DataLedger
from protos import swarmtrain_pb2 as pb
from worker.data.leases import DataLeases


class MemoryStore:
    """Every range ever saved, by id: what the SQLite table holds."""

    def __init__(self) -> None:
        self.rows: dict[int, DataRange] = {}

    def save(self, ranges) -> None:
        self.rows.update((r.range_id, r) for r in ranges)


def tiling_ok(rows: dict[int, DataRange], ledger: DataLedger) -> None:
    """Each epoch's ranges cover [0, its end) exactly once: a position is in one range only."""
    by_epoch: dict[int, list[DataRange]] = {}
    for r in rows.values():
        by_epoch.setdefault(r.epoch, []).append(r)
    for epoch, ranges in by_epoch.items():
        ranges.sort(key=lambda r: r.start)
        assert ranges[0].start == 0
        for a, b in pairwise(ranges):
            assert a.end == b.start, (epoch, a, b)
        assert ranges[-1].end == (ledger.cursor if epoch == ledger.epoch else ledger.positions)


def test_two_replicas_train_every_position_of_an_epoch_once_then_the_next_epoch_begins() -> None:
    store = MemoryStore()
    ledger = DataLedger(positions=100, range_size=16, store=store)
    trained: list[tuple[int, int]] = []  # (epoch, position)
    for _ in range(10):  # 100 positions in ranges of 16: seven ranges, taken two at a time
        for worker in ("a", "b"):
            held = ledger.held_by(worker)
            assert len(held) == HELD_RANGES and all(r.worker_id == worker for r in held)
            first = held[0]
            acked = ledger.report(worker, [(first.range_id, first.end - first.start)])
            assert acked == [(first.range_id, first.end - first.start)]
            trained += [(first.epoch, p) for p in range(first.start, first.end)]
    last = max(e for e, _ in trained)
    assert last >= 2
    for epoch in range(last + 1):
        positions = sorted(p for e, p in trained if e == epoch)
        if epoch < last:  # a whole epoch: every position, none twice
            assert positions == list(range(100)), epoch
        else:
            assert len(positions) == len(set(positions))
    tiling_ok(store.rows, ledger)


def test_a_replica_that_leaves_keeps_what_it_reported_and_the_rest_is_handed_out_first() -> None:
    store = MemoryStore()
    ledger = DataLedger(positions=1000, range_size=10, store=store)
    a_held = ledger.held_by("a")
    ledger.report("a", [(a_held[0].range_id, 4)])
    ledger.release({"b"})  # "a" is no longer a stage-0 replica
    assert not [r for r in ledger.open.values() if r.worker_id == "a"]
    kept = store.rows[a_held[0].range_id]
    assert (kept.start, kept.end, kept.trained, kept.worker_id) == (0, 4, 4, "")
    b_held = ledger.held_by("b")
    assert [(r.start, r.end) for r in b_held] == [(4, 10), (10, 20)]  # the remainders, oldest first
    # a late report from "a" on a range it no longer holds is neither recorded nor acknowledged
    assert ledger.report("a", [(a_held[1].range_id, 10)]) == []
    assert all(r.trained == 0 for r in b_held)
    tiling_ok(store.rows, ledger)


@settings(max_examples=80, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["hold", "report", "release"]), st.integers(0, 2),
                              st.integers(0, 12)), max_size=60))
def test_whatever_replicas_do_positions_are_never_handed_out_twice(ops) -> None:
    store = MemoryStore()
    ledger = DataLedger(positions=37, range_size=6, store=store)
    workers = ["w0", "w1", "w2"]
    acked: dict[tuple[int, int], str] = {}  # (epoch, position) -> who it was acknowledged to
    active = set(workers)
    for op, who, amount in ops:
        worker = workers[who]
        if op == "hold" and worker in active:
            ledger.held_by(worker)
        elif op == "report":
            mine = [r for r in ledger.open.values() if r.worker_id == worker]
            before = {r.range_id: r.trained for r in mine}
            for range_id, trained in ledger.report(worker, [(r.range_id, r.trained + amount) for r in mine]):
                r = store.rows[range_id]
                for p in range(r.start + before[range_id], r.start + trained):
                    assert (r.epoch, p) not in acked, "a position acknowledged twice"
                    acked[(r.epoch, p)] = worker
        elif op == "release":
            active ^= {worker}
            ledger.release(active)
        tiling_ok(store.rows, ledger)


def test_the_ledger_comes_back_whole_from_sqlite_after_a_restart(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "registry.sqlite", isolation_level=None)
    ledger = DataLedger(positions=50, range_size=8, store=DataRangeStore(db))
    a = ledger.held_by("a")
    ledger.report("a", [(a[0].range_id, 8), (a[1].range_id, 3)])
    ledger.held_by("b")
    ledger.release({"a"})
    db.close()
    db = sqlite3.connect(tmp_path / "registry.sqlite", isolation_level=None)
    store = DataRangeStore(db)
    again = DataLedger(positions=50, range_size=8, store=store, ranges=store.load())
    assert again.open == ledger.open and (again.epoch, again.cursor) == (ledger.epoch, ledger.cursor)
    # "a" still holds its second range (3 of it trained) and tops up with the first range "b" gave back
    assert [(r.start, r.trained) for r in again.held_by("a")] == [(8, 3), (16, 0)]
    assert [r.start for r in again.held_by("c")] == [24, 32]  # b's other range, then a fresh one
    db.close()


# ---- the worker's side -----------------------------------------------------------------


def reply(ranges=(), acked=(), fingerprint="fp") -> pb.HeartbeatResponse:
    response = pb.HeartbeatResponse(data_fingerprint=fingerprint)
    for range_id, start, end, *trained in ranges:  # (id, start, end[, trained as the coordinator records it])
        response.data_ranges.add(range_id=range_id, epoch=0, start=start, end=end, trained=sum(trained))
    for range_id, trained in acked:
        response.data_acknowledged.add(range_id=range_id, trained=trained)
    return response


def test_a_replica_trains_its_ranges_in_order_and_traces_only_what_was_acknowledged() -> None:
    leases = DataLeases()
    assert leases.take(4) is None  # nothing handed out yet
    leases.update(reply([(1, 0, 8), (2, 8, 16)]))
    steps = [leases.take(4) for _ in range(3)]
    assert [(s.range_id, s.start) for s in steps] == [(1, 0), (1, 4), (2, 8)]
    leases.trained(steps[0])
    leases.trained(steps[1])
    assert [(p.range_id, p.trained) for p in leases.progress()] == [(1, 8)]
    leases.give_back()  # the third step was read ahead: it goes back
    assert leases.take(4).start == 8
    # the reply acknowledges range 1 whole and no longer lists it (finished): one span for the trace
    spans = leases.update(reply([(2, 8, 16), (3, 16, 24)], acked=[(1, 8)]))  # 1 is finished: not listed
    assert [(s.range_id, s.start, s.end) for s in spans] == [(1, 0, 8)]
    assert [(r.range_id, r.start, r.count) for r in leases.held()] == [(2, 12, 4), (3, 16, 8)]
    ahead = leases.take(4, peek=True)
    assert ahead == leases.take(4, peek=True)  # peeking takes nothing
    assert leases.update(reply([(2, 8, 16), (3, 16, 24)], acked=[(1, 8)])) == []  # a repeat: no new span
    # a range taken back (not listed) is dropped: a step taken from it counts for nothing, and a
    # step peeked at before the reply is not taken after it
    leases.update(reply([(3, 16, 24)]))
    leases.trained(ahead)
    assert leases.take(4, expected=ahead) is None
    assert leases.progress() == [] and leases.take(8).range_id == 3


def test_a_range_handed_back_after_a_rollback_starts_again_where_the_coordinator_says() -> None:
    leases = DataLeases()
    leases.update(reply([(1, 0, 8)]))
    old = leases.take(4)
    leases.trained(old)
    leases.update(reply([(1, 0, 8, 4)], acked=[(1, 4)]))
    stale = leases.take(4)  # in flight when the swarm rolls back
    # the rollback rewound the ledger: range 1 again, nothing of it trained
    leases.update(reply([(1, 0, 8)]))
    leases.trained(stale)  # trained on the discarded weights: it must not count
    assert [(r.start, r.count) for r in leases.held()] == [(0, 8)] and leases.progress() == []
    again = leases.take(4)
    assert again.start == 0 and again.serial != old.serial


def test_a_rollback_to_a_checkpoint_hands_out_again_what_was_trained_since(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "registry.sqlite", isolation_level=None)
    store = DataRangeStore(db)
    ledger = DataLedger(positions=100, range_size=10, store=store)
    first = ledger.held_by("a")[0]
    ledger.report("a", [(first.range_id, 10)])
    store.snapshot(7)  # checkpoint 7 opens: [0, 10) trained, [10, 20) held by "a"
    later = ledger.held_by("a")
    ledger.report("a", [(r.range_id, 10) for r in later])  # [10, 30) trained after it
    store.snapshot(7)  # a second call keeps the first snapshot
    snapshot = store.snapshot_of(7)
    assert snapshot is not None and store.snapshot_of(8) is None
    ledger.rewind(snapshot)
    again = ledger.held_by("b")
    assert [(r.start, r.end) for r in again] == [(10, 20), (20, 30)]  # trained since the checkpoint: again
    assert all(r.worker_id != "a" for r in ledger.open.values())
    reread = DataLedger(positions=100, range_size=10, store=store, ranges=store.load())
    assert reread.open == ledger.open and reread.cursor == 30
    ledger.rewind([])  # back to the seed: the epoch starts over
    assert [(r.start, r.end) for r in ledger.held_by("c")] == [(0, 10), (10, 20)]
    # with fresh ids, also after a restart: a replica may still hold one from before the rewind
    used = {r.range_id for r in later} | {first.range_id}
    restarted = DataLedger(positions=100, range_size=10, store=store, ranges=store.load(), next_id=store.next_id())
    restarted.rewind([])
    assert not {r.range_id for r in restarted.held_by("d")} & used
    db.close()


def test_the_swarm_hands_stage_zero_its_data_and_a_rollback_to_the_seed_starts_the_epoch_over(tmp_path: Path) -> None:
    from configs.schema import DataConfig
    from coordinator.data.prepare import prepare
    from tests.harness.swarm_state import Clock, make_swarm, profile

    prepare(DataConfig(max_corpus_bytes=400_000, validation_fraction=0.2), tmp_path / "prepared", shard_tokens=1 << 16)
    clock = Clock()
    swarm = make_swarm(tmp_path / "state", clock, f"data.prepared={tmp_path / 'prepared'}", "data.handout_steps=2")
    joined = [swarm.join(pb.JoinRequest(profile=profile()), "ipv4:127.0.0.1:1") for _ in range(2)]
    (driver, driver_token), (last, last_token) = sorted(
        ((r.worker_id, token) for r, token in joined), key=lambda wt: swarm.registry.workers[wt[0]].stage_index)
    assert swarm.registry.workers[driver].stage_index == 0 and swarm.registry.workers[last].stage_index == 1

    def beat(worker: str, token: str, progress=(), tokens: int = 0) -> pb.HeartbeatResponse:
        record = swarm.registry.workers[worker]
        return swarm.heartbeat(pb.HeartbeatRequest(
            worker_id=worker, session_token=token, plan_version=record.assigned_version,
            counters=pb.Counters(tokens=tokens, loss_sum=2.0 if tokens else 0.0, loss_count=1 if tokens else 0),
            data_progress=[pb.DataProgress(range_id=i, trained=n) for i, n in progress]))

    first = beat(driver, driver_token)
    step = swarm.config.training.batch_size
    assert first.data_fingerprint and [(r.start, r.end) for r in first.data_ranges] == [(0, 2 * step), (2 * step, 4 * step)]
    assert not beat(last, last_token).data_ranges  # only stage 0 is handed data
    acked = beat(driver, driver_token, progress=[(first.data_ranges[0].range_id, 2 * step)])
    assert [(a.range_id, a.trained) for a in acked.data_acknowledged] == [(first.data_ranges[0].range_id, 2 * step)]
    beat(last, last_token, tokens=20_480)
    # the last stage's only replica is lost: with no checkpoint the swarm goes back to the seed, data too
    clock.now += swarm.config.coordinator.heartbeat_timeout_s + 1
    swarm.registry.record_heartbeat(replace(swarm.registry.workers[driver], last_heartbeat_unix=clock.now))
    assert swarm.sweep() == [last]
    newcomer, newcomer_token = swarm.join(pb.JoinRequest(profile=profile()), "ipv4:127.0.0.1:1")
    assert swarm.ledger.generation.number == 1
    tokens = {driver: driver_token, newcomer.worker_id: newcomer_token}
    now_driver = next(w for w in tokens if swarm.registry.workers[w].stage_index == 0)
    again = swarm.heartbeat(pb.HeartbeatRequest(worker_id=now_driver, session_token=tokens[now_driver],
                                                plan_version=swarm.registry.workers[now_driver].assigned_version))
    # the rollback took the data back to the seed too: the epoch is handed out from its start again
    assert [(r.start, r.trained) for r in again.data_ranges] == [(0, 0), (2 * step, 0)]
