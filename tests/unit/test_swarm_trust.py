"""Bans after peer reports and revocable join tokens, over a real SQLite registry and a test clock."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from configs.version import SOFTWARE_VERSION
from coordinator.api.service import swarm_view
from coordinator.api.validation import InvalidRequest
from coordinator.storage.join_tokens import TokenStore
from coordinator.storage.registry import ACTIVE, BANNED, REVOKED
from coordinator.swarm.admission import TOKEN_REREAD_S
from coordinator.swarm.orchestrator import Swarm
from protos import swarmtrain_pb2 as pb
from tests.harness.swarm_state import SMALL, Clock, make_swarm

BIG = 2**30  # holds the tiny model whole: every worker is a replica of stage 0
PEERS = [f"12D3KooW{c * 44}" for c in "ABCDEFGH"]  # base58, as hivemind peer ids look


def join_as(swarm: Swarm, peer: str, memory: int = BIG, join_token: str = "") -> tuple[str, str]:
    profile = pb.WorkerProfile(software_version=SOFTWARE_VERSION, memory_bytes=memory, achieved_flops=5e12,
                               upload_bps=1e9, download_bps=1e9, peer_id=peer)
    record, token = swarm.join(pb.JoinRequest(profile=profile, join_token=join_token), "ipv4:127.0.0.1:1")
    return record.worker_id, token


def report(swarm: Swarm, reporter: tuple[str, str], peer: str, reason: str = "outlier",
           count: int = 1) -> pb.HeartbeatResponse:
    worker_id, token = reporter
    counters = pb.Counters(reports=[pb.PeerReport(peer_id=peer, reason=reason, count=count)])
    return swarm.heartbeat(pb.HeartbeatRequest(worker_id=worker_id, session_token=token, plan_version=1 << 40,
                                               counters=counters))


def refusal(call: Callable[..., object], *args: object) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        call(*args)
    return caught.value


def beat(swarm: Swarm, worker: tuple[str, str]) -> pb.HeartbeatResponse:
    return swarm.heartbeat(pb.HeartbeatRequest(worker_id=worker[0], session_token=worker[1]))


def test_repeated_outlier_reports_ban_the_worker_for_good(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    swarm = make_swarm(tmp_path, clock)
    reporter, target, third = join_as(swarm, PEERS[0]), join_as(swarm, PEERS[1]), join_as(swarm, PEERS[2])
    assert swarm.plan is not None and target[0] in swarm.plan.stage_of
    step = swarm.config.coordinator.heartbeat_interval_s
    for _ in range(4):
        report(swarm, reporter, PEERS[1], count=50)
        clock.now += step
    assert swarm.registry.workers[target[0]].state == ACTIVE  # 4 intervals: not yet
    version = swarm.plan_version
    report(swarm, reporter, PEERS[1])
    banned = swarm.registry.workers[target[0]]
    assert (banned.state, banned.stage_index) == (BANNED, -1)
    assert banned.expelled_reason == "banned after 5 outlier reports from 1 peer"
    assert f"banned worker {target[0]} (peer {PEERS[1]}): 5 outlier reports from 1 peer" in capsys.readouterr().out
    # re-planned at once, like a Leave: out of the plan, not active in GetSwarm
    assert swarm.plan_version > version and target[0] not in swarm.plan.stage_of
    states = {w.worker_id: w.state for w in swarm_view(swarm).workers}
    assert states == {reporter[0]: pb.WORKER_STATE_ACTIVE, target[0]: pb.WORKER_STATE_BANNED,
                      third[0]: pb.WORKER_STATE_ACTIVE}
    message = f"worker {target[0]} was banned after 5 outlier reports from 1 peer"
    assert (refusal(beat, swarm, target).code, str(refusal(beat, swarm, target))) == ("PERMISSION_DENIED", message)
    swarm.leave(pb.LeaveRequest(worker_id=target[0], session_token=target[1]))  # no way back through Leave
    rejoin = pb.JoinRequest(profile=swarm.worker_profile(banned), worker_id=target[0], session_token=target[1])
    assert str(refusal(swarm.join, rejoin, "ipv4:127.0.0.1:1")) == message
    # a new worker id does not launder the banned peer id
    fresh = refusal(join_as, swarm, PEERS[1])
    assert fresh.code == "PERMISSION_DENIED" and f"belongs to worker {target[0]}, which was banned" in str(fresh)

    swarm.registry.close()  # the ban is in SQLite: a restarted coordinator keeps it
    again = make_swarm(tmp_path, clock)
    assert again.registry.workers[target[0]].state == BANNED
    assert str(refusal(beat, again, target)) == message
    assert refusal(join_as, again, PEERS[1]).code == "PERMISSION_DENIED"


def test_fast_beats_and_implausible_reports_do_not_add_up(tmp_path: Path) -> None:
    clock = Clock()
    swarm = make_swarm(tmp_path, clock)
    reporter, _ = join_as(swarm, PEERS[0]), join_as(swarm, PEERS[1])
    for _ in range(50):  # fifty beats within one heartbeat interval, each with a huge count
        report(swarm, reporter, PEERS[1], count=1000)
        clock.now += swarm.config.coordinator.heartbeat_interval_s / 50
    for reason in ("malformed", "unauthorized"):  # honest peers cause these too
        for _ in range(10):
            report(swarm, reporter, PEERS[1], reason=reason)
            clock.now += swarm.config.coordinator.heartbeat_interval_s
    report(swarm, reporter, PEERS[0])  # itself
    report(swarm, reporter, PEERS[5])  # nobody's peer id
    assert all(r.state == ACTIVE for r in swarm.registry.workers.values())


def test_outliers_count_only_within_a_stage(tmp_path: Path) -> None:
    clock = Clock()
    swarm = make_swarm(tmp_path, clock)
    workers = [join_as(swarm, peer, memory=SMALL) for peer in PEERS[:4]]
    assert swarm.plan is not None and swarm.plan.num_stages == 2
    stage = {w: swarm.registry.workers[w[0]].stage_index for w in workers}
    reporter = workers[0]
    other_stage = next(w for w in workers if stage[w] != stage[reporter])
    target_peer = PEERS[workers.index(other_stage)]
    for _ in range(10):
        report(swarm, reporter, target_peer, reason="outlier")  # it never averages with another stage
        clock.now += swarm.config.coordinator.heartbeat_interval_s
    assert swarm.registry.workers[other_stage[0]].state == ACTIVE
    for _ in range(5):
        report(swarm, reporter, target_peer, reason="non_finite")  # adjacent stages exchange tensors
        clock.now += swarm.config.coordinator.heartbeat_interval_s
    assert swarm.registry.workers[other_stage[0]].state == BANNED


def test_a_banned_reporters_accusations_stop_counting(tmp_path: Path) -> None:
    clock = Clock()
    swarm = make_swarm(tmp_path, clock)
    liar, victim, accuser = join_as(swarm, PEERS[0]), join_as(swarm, PEERS[1]), join_as(swarm, PEERS[2])
    step = swarm.config.coordinator.heartbeat_interval_s
    for _ in range(4):
        report(swarm, liar, PEERS[1])
        clock.now += step
    for _ in range(5):
        report(swarm, accuser, PEERS[0])
        clock.now += step
    assert swarm.registry.workers[liar[0]].state == BANNED
    report(swarm, accuser, PEERS[1])  # the fifth strike, but the liar's four no longer count
    assert swarm.registry.workers[victim[0]].state == ACTIVE


def test_zero_never_bans(tmp_path: Path) -> None:
    clock = Clock()
    swarm = make_swarm(tmp_path, clock, "coordinator.ban_after_reports=0")
    reporter, target = join_as(swarm, PEERS[0]), join_as(swarm, PEERS[1])
    for _ in range(20):
        report(swarm, reporter, PEERS[1])
        clock.now += swarm.config.coordinator.heartbeat_interval_s
    assert swarm.registry.workers[target[0]].state == ACTIVE


def test_a_live_peer_id_belongs_to_one_worker(tmp_path: Path) -> None:
    swarm = make_swarm(tmp_path, Clock())
    first = join_as(swarm, PEERS[0])
    assert refusal(join_as, swarm, PEERS[0]).code == "ALREADY_EXISTS"
    swarm.leave(pb.LeaveRequest(worker_id=first[0], session_token=first[1]))
    join_as(swarm, PEERS[0])  # once it left, the peer id may come back under a new worker


# ---- join tokens --------------------------------------------------------------------------


def test_revoking_a_token_expels_its_workers_at_the_next_sweep(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    swarm = make_swarm(tmp_path, clock, "coordinator.join_token=static-token")
    cli = TokenStore.open(tmp_path)  # a second connection, as `coordinator token` opens it
    alice, bob = cli.add("alice", clock.now), cli.add("bob", clock.now)
    clock.now += TOKEN_REREAD_S  # an unknown token re-reads the table, at most this often
    a = join_as(swarm, PEERS[0], join_token=alice)  # a token added after start: no sweep needed
    b = join_as(swarm, PEERS[1], join_token=bob)
    s = join_as(swarm, PEERS[2], join_token="static-token")
    assert [swarm.registry.workers[w[0]].join_token_name for w in (a, b, s)] == ["alice", "bob", ""]
    cli.revoke("alice", clock.now)
    assert swarm.registry.workers[a[0]].state == ACTIVE  # nothing until the coordinator re-reads
    version = swarm.plan_version
    swarm.sweep()
    assert {w: swarm.registry.workers[w[0]].state for w in (a, b, s)} == {a: REVOKED, b: ACTIVE, s: ACTIVE}
    assert swarm.plan_version > version and a[0] not in swarm.plan.stage_of
    assert f"join token alice revoked: expelled 1 worker(s): {a[0]}" in capsys.readouterr().out
    denied = refusal(beat, swarm, a)
    assert denied.code == "PERMISSION_DENIED"
    assert str(denied) == (f"worker {a[0]} was expelled: join token alice was revoked; "
                           "ask the swarm's operator for a new token")
    again = refusal(join_as, swarm, PEERS[3], BIG, alice)
    assert (again.code, str(again)) == ("UNAUTHENTICATED",
                                        "join token alice was revoked: ask the swarm's operator for a new one")
    for other in (b, s):  # other tokens' workers, and the config token's, carry on
        assert beat(swarm, other).instruction in (pb.INSTRUCTION_CONTINUE, pb.INSTRUCTION_REASSIGN)
    cli.close()
    # a restarted coordinator still refuses the expelled worker
    swarm.registry.close()
    restarted = make_swarm(tmp_path, clock, "coordinator.join_token=static-token")
    assert restarted.registry.workers[a[0]].state == REVOKED
    assert refusal(beat, restarted, a).code == "PERMISSION_DENIED"


def test_a_token_revoked_while_the_coordinator_was_down_expels_on_start(tmp_path: Path) -> None:
    clock = Clock()
    swarm = make_swarm(tmp_path, clock)
    cli = TokenStore.open(tmp_path)
    token = cli.add("alice", clock.now)
    clock.now += TOKEN_REREAD_S
    worker = join_as(swarm, PEERS[0], join_token=token)
    swarm.registry.close()
    cli.revoke("alice", clock.now)
    restarted = make_swarm(tmp_path, clock)
    assert restarted.registry.workers[worker[0]].state == REVOKED
    assert restarted.plan is None or worker[0] not in restarted.plan.stage_of


def test_once_a_token_is_issued_the_swarm_is_closed(tmp_path: Path) -> None:
    clock = Clock()
    swarm = make_swarm(tmp_path, clock)
    join_as(swarm, PEERS[0])  # no config token, no managed token: open to all
    cli = TokenStore.open(tmp_path)
    cli.add("alice", clock.now)
    cli.revoke("alice", clock.now)  # revoking the last token must not reopen the swarm
    swarm.sweep()
    assert str(refusal(join_as, swarm, PEERS[1])).startswith("no join token: ")
    assert str(refusal(join_as, swarm, PEERS[1], BIG, "guess")).startswith("a wrong join token: ")
