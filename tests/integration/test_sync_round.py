"""Averaging rounds between real P2P peers: the leader's mean lands bit for bit on every follower,
and a round request from the wrong peer, for the wrong round, or with the wrong shapes is refused
without touching anyone's parameters."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.proto import runtime_pb2

from configs.loader import load_config
from tests.harness.loopback import loopback_peers
from worker.compression import Encoded, decode_any
from worker.model.stage import build_stage
from worker.pipeline import Replica, RequestRejected, StageClient, StageExecutor
from worker.pipeline.wire import Payload, handler_name
from worker.replicas import SyncFollower, lead_round, leads, params_digest
from worker.replicas.diloco import OuterSettings, ReplicaSync
from worker.replicas.sync_round import BEGIN, COMMIT
from worker.runtime.standalone import build_optimizer

pytestmark = pytest.mark.multiprocess  # replicas on p2pd daemons

CONFIG = load_config("tiny", ["model.n_layer=2"])
KEY = "sync-test.stage1.1-2"


AVERAGING = OuterSettings(lr=1.0, momentum=0.0, codec="none")  # a round is the plain mean


def replica_stage(shift: float, settings: OuterSettings = AVERAGING
                  ) -> tuple[torch.nn.Module, StageExecutor, ReplicaSync]:
    stage = build_stage(CONFIG.model, 1, 2, seed=0)
    sync = ReplicaSync(list(stage.parameters()), settings)  # every replica on the seed's anchor
    with torch.no_grad():
        for p in stage.parameters():
            p.add_(shift)  # then each trained somewhere else
    return stage, StageExecutor(stage, build_optimizer(stage, CONFIG.training), CONFIG.training.batch_size), sync


def snapshot(stage: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in stage.parameters()]


def test_leads_is_the_lowest_peer_id() -> None:
    assert leads("A", ["B", "C"]) and not leads("B", ["A", "C"]) and leads("A", [])


def test_a_round_leaves_leader_and_followers_with_the_same_mean() -> None:
    async def main() -> None:
        async with loopback_peers(3) as peers:
            ordered = sorted(peers, key=lambda p: p.peer_id.to_base58())
            stages = [replica_stage(float(i)) for i in range(3)]
            expected = [torch.stack(ts).mean(0) for ts in zip(*(snapshot(s) for s, _, _ in stages), strict=True)]
            followers = [await SyncFollower(p, KEY, s, sync, lambda e=e: e, lambda: 0).start()
                         for p, (s, e, sync) in zip(ordered[1:], stages[1:], strict=True)]
            client = StageClient(ordered[0])
            replicas = [Replica(p.peer_id, tuple(await p.get_visible_maddrs())) for p in ordered[1:]]
            result = await lead_round(client, replicas, KEY, stages[0][0], stages[0][1], stages[0][2])
            assert (result.participants, result.agreed, result.left_out, result.problems) == (3, 3, 0, [])
            for stage, _, sync in stages:
                assert sync.round == 1
                for got, want in zip(stage.parameters(), expected, strict=True):
                    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-5)
            assert len({params_digest(list(s.parameters())) for s, _, _ in stages}) == 1  # bit-identical
            for follower in followers:
                await follower.stop()
    asyncio.run(main())


def test_a_follower_trains_on_during_a_round_and_keeps_that_progress_on_the_new_anchor() -> None:
    async def main() -> None:
        async with loopback_peers(2) as peers:
            low, high = sorted(peers, key=lambda p: p.peer_id.to_base58())
            stage, executor, sync = replica_stage(0.5)
            follower = await SyncFollower(high, KEY, stage, sync, lambda: executor, lambda: 0).start()
            client = StageClient(low)
            client.add_addresses(high.peer_id, await high.get_visible_maddrs())
            reply = await client.call(high.peer_id, KEY, BEGIN, Payload(meta={"round": "r1"}), "none", 10)
            assert reply.meta["anchor_round"] == 0
            # the round is open, yet the stage is free: a step between begin and commit runs at once
            drift = [torch.full_like(p, 0.25) for p in stage.parameters()]

            def local_step() -> None:
                with torch.no_grad():
                    for p, d in zip(stage.parameters(), drift, strict=True):
                        p.add_(d)

            await asyncio.wait_for(executor.exclusive(local_step), timeout=5)
            anchor = [torch.randn_like(p) for p in stage.parameters()]
            reply = await client.call(high.peer_id, KEY, COMMIT,
                                      Payload([t.clone() for t in anchor],
                                              meta={"round": "r1", "kind": "full", "anchor_round": 3}),
                                      "none", 10)
            assert reply.meta["loaded"] is True and reply.meta["digest"] == params_digest(anchor)
            assert sync.round == 3 and all(torch.equal(a, b) for a, b in zip(sync.anchor, anchor, strict=True))
            for got, a, d in zip(stage.parameters(), anchor, drift, strict=True):  # the new anchor + the step
                torch.testing.assert_close(got.detach(), a + d, rtol=0, atol=1e-6)
            # one commit per round: a second is refused and moves nothing
            with pytest.raises(RequestRejected, match="no round 'r1' open"):
                await client.call(high.peer_id, KEY, COMMIT, Payload(meta={"round": "r1"}), "none", 10)
            await follower.stop()
    asyncio.run(main())


def test_a_leader_that_asks_again_gets_the_same_answer_and_another_round_waits() -> None:
    async def main() -> None:
        async with loopback_peers(2) as peers:
            low, high = sorted(peers, key=lambda p: p.peer_id.to_base58())
            stage, executor, sync = replica_stage(0.5, OuterSettings(codec="topk_4bit", topk_fraction=0.05))
            follower = await SyncFollower(high, KEY, stage, sync, lambda: executor, lambda: 0).start()
            client = StageClient(low)
            client.add_addresses(high.peer_id, await high.get_visible_maddrs())
            first = await client.call(high.peer_id, KEY, BEGIN, Payload(meta={"round": "r1"}), "none", 10)
            # an answer cut short on the way is asked for again: the same pseudo-gradient, not a
            # second one (top-k's error feedback would have moved on)
            again = await client.call(high.peer_id, KEY, BEGIN, Payload(meta={"round": "r1"}), "none", 10)
            assert first.meta == again.meta
            assert all(torch.equal(a, b) for a, b in zip(first.tensors, again.tensors, strict=True))
            with pytest.raises(RequestRejected, match="in another round already"):
                await client.call(high.peer_id, KEY, BEGIN, Payload(meta={"round": "r2"}), "none", 10)
            await follower.stop()
    asyncio.run(main())


@pytest.mark.fault("an averaging answer cut short ({lost})")
@pytest.mark.parametrize("lost", ["the last frame", "every frame"])
def test_a_leader_asks_again_for_an_answer_cut_short_and_the_round_completes(lost: str) -> None:
    async def main() -> None:
        async with loopback_peers(2) as peers:
            low, high = sorted(peers, key=lambda p: p.peer_id.to_base58())
            stages = [replica_stage(0.0), replica_stage(1.0)]
            expected = [torch.stack(ts).mean(0) for ts in zip(*(snapshot(s) for s, _, _ in stages), strict=True)]
            stage, executor, sync = stages[1]
            follower = await SyncFollower(high, KEY, stage, sync, lambda: executor, lambda: 0).start()
            # the follower's first begin answer loses its last frame, or all of them, on the way
            real = follower._serve(follower._begin, 64 * 1024, None)
            answers = 0

            async def cut_once(requests, context):  # noqa: ANN001, ANN202 - a hivemind stream handler
                nonlocal answers
                answers += 1
                frames = [frame async for frame in real(requests, context)]
                kept = (frames[:-1] if lost == "the last frame" else []) if answers == 1 else frames
                for frame in kept:
                    yield frame

            name = handler_name(KEY, BEGIN)
            await high.remove_protobuf_handler(name, stream_input=True, stream_output=True)
            await high.add_protobuf_handler(name, cut_once, runtime_pb2.ExpertRequest,
                                            stream_input=True, stream_output=True)
            replica = Replica(high.peer_id, tuple(await high.get_visible_maddrs()))
            result = await lead_round(StageClient(low), [replica], KEY, *stages[0])
            assert answers == 2  # asked again, once
            assert (result.participants, result.agreed, result.left_out, result.problems) == (2, 2, 0, [])
            for stage_, _, sync_ in stages:
                assert sync_.round == 1
                for got, want in zip(stage_.parameters(), expected, strict=True):
                    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-5)
            assert params_digest(list(stages[0][0].parameters())) == params_digest(list(stage.parameters()))
            await follower.stop()
    asyncio.run(main())


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("begin from a higher peer id", r"does not lead rounds"),
        ("commit without a begin", r"no round 'r1' open with this peer"),
        ("begin without a round id", r"round id must be 1\.\.64 printable characters"),
        ("commit with the wrong shapes", r"the round's outcome does not fit this stage"),
    ],
)
def test_bad_round_requests_are_refused_and_change_nothing(case: str, message: str) -> None:
    async def main() -> None:
        async with loopback_peers(2) as peers:
            low, high = sorted(peers, key=lambda p: p.peer_id.to_base58())
            stage, executor, sync = replica_stage(1.0)
            # the follower is the peer that the request must come from the wrong side of
            follower_peer, caller = (low, high) if case == "begin from a higher peer id" else (high, low)
            follower = await SyncFollower(follower_peer, KEY, stage, sync, lambda: executor, lambda: 0).start()
            before = snapshot(stage)
            client = StageClient(caller)
            client.add_addresses(follower_peer.peer_id, await follower_peer.get_visible_maddrs())
            with pytest.raises(RequestRejected, match=message):
                if case == "commit with the wrong shapes":
                    await client.call(follower_peer.peer_id, KEY, BEGIN, Payload(meta={"round": "r1"}), "none", 10)
                    wrong = [torch.zeros(3) for _ in stage.parameters()]
                    await client.call(follower_peer.peer_id, KEY, COMMIT,
                                      Payload(wrong, meta={"round": "r1", "kind": "full", "anchor_round": 1}),
                                      "none", 10)
                elif case == "commit without a begin":
                    await client.call(follower_peer.peer_id, KEY, COMMIT, Payload(meta={"round": "r1"}), "none", 10)
                elif case == "begin without a round id":
                    await client.call(follower_peer.peer_id, KEY, BEGIN, Payload(), "none", 10)
                else:
                    await client.call(follower_peer.peer_id, KEY, BEGIN, Payload(meta={"round": "r1"}), "none", 10)
            for got, want in zip(stage.parameters(), before, strict=True):
                assert torch.equal(got.detach(), want)
            # and the follower is free again: its executor takes work at once
            assert await asyncio.wait_for(executor.exclusive(lambda: 1), timeout=5) == 1
            await follower.stop()
    asyncio.run(main())


@pytest.mark.parametrize("codec", ["blockwise_8bit", "topk_4bit", "powersgd"])
def test_compressed_outer_step_rounds_leave_replicas_identical_and_catch_up_a_stale_one(codec: str) -> None:
    settings = OuterSettings(lr=0.7, momentum=0.9, codec=codec, block_size=64, topk_fraction=0.05, rank=2)

    async def main() -> None:
        async with loopback_peers(3) as peers:
            ordered = sorted(peers, key=lambda p: p.peer_id.to_base58())
            stages = [replica_stage(0.01 * (i + 1), settings) for i in range(3)]
            for _, _, sync in stages:
                sync.round = 7
            stages[2][2].round = 3  # this one missed rounds: it must get the new anchor whole
            followers = [await SyncFollower(p, KEY, s, sync, lambda e=e: e, lambda: 0).start()
                         for p, (s, e, sync) in zip(ordered[1:], stages[1:], strict=True)]
            client = StageClient(ordered[0])
            replicas = [Replica(p.peer_id, tuple(await p.get_visible_maddrs())) for p in ordered[1:]]
            for round_number in (1, 2):
                result = await lead_round(client, replicas, KEY, stages[0][0], stages[0][1], stages[0][2])
                assert (result.participants, result.agreed) == ((2, 3) if round_number == 1 else (3, 3)), result
                assert {sync.round for _, _, sync in stages} == {7 + round_number}
                assert len({params_digest(list(s.parameters())) for s, _, _ in stages}) == 1
                for stage, _, _ in stages:  # drift apart again before the next round
                    with torch.no_grad():
                        for p in stage.parameters():
                            p.add_(torch.randn_like(p) * 1e-3)
            for follower in followers:
                await follower.stop()
    asyncio.run(main())


class LyingSync(ReplicaSync):
    """A replica that sends its pseudo-gradient sign-flipped and scaled by 1000."""

    def pseudo_gradient(self, params):  # noqa: ANN001, ANN201 - as the parent's
        return [Encoded([-1000 * decode_any(e).reshape(-1)], dict(e.meta)) for e in super().pseudo_gradient(params)]


def test_a_lying_replica_among_four_is_clipped_and_named() -> None:
    async def main() -> None:
        async with loopback_peers(4) as peers:
            ordered = sorted(peers, key=lambda p: p.peer_id.to_base58())
            stages = [replica_stage(0.01) for _ in range(4)]  # the honest three agree
            liar_stage, liar_executor, liar_sync = stages[3]
            lying = LyingSync(list(liar_sync.anchor), AVERAGING)
            stages[3] = (liar_stage, liar_executor, lying)
            followers = [await SyncFollower(p, KEY, s, sync, lambda e=e: e, lambda: 0).start()
                         for p, (s, e, sync) in zip(ordered[1:], stages[1:], strict=True)]
            before = snapshot(stages[0][0])
            client = StageClient(ordered[0])
            replicas = [Replica(p.peer_id, tuple(await p.get_visible_maddrs())) for p in ordered[1:]]
            result = await lead_round(client, replicas, KEY, stages[0][0], stages[0][1], stages[0][2])
            assert result.outliers == [ordered[3].peer_id.to_base58()]
            for got, was in zip(stages[0][0].parameters(), before, strict=True):
                assert float((got.detach() - was).abs().max()) < 0.005  # at most a clipped nudge, not -10
            for follower in followers:
                await follower.stop()
    asyncio.run(main())


def test_followers_refuse_a_lying_leaders_outcome_keep_their_parameters_and_report_it() -> None:
    async def main() -> None:
        async with loopback_peers(3) as peers:
            ordered = sorted(peers, key=lambda p: p.peer_id.to_base58())
            stages = [replica_stage(0.01) for _ in range(3)]
            leader_stage, leader_executor, honest_sync = stages[0]
            lying = ReplicaSync(list(honest_sync.anchor), AVERAGING, lie_scale=-1000)
            reported: list[tuple[str, str]] = []
            rounds: list = []
            followers = [await SyncFollower(p, KEY, s, sync, lambda e=e: e, lambda: 0, rounds.append,
                                            on_refused=lambda peer, why: reported.append((peer, why))).start()
                         for p, (s, e, sync) in zip(ordered[1:], stages[1:], strict=True)]
            before = [snapshot(s) for s, _, _ in stages[1:]]
            client = StageClient(ordered[0])
            replicas = [Replica(p.peer_id, tuple(await p.get_visible_maddrs())) for p in ordered[1:]]
            result = await lead_round(client, replicas, KEY, leader_stage, leader_executor, lying)
            assert (result.participants, result.agreed, result.refused) == (3, 1, 2), result
            assert len(result.problems) == 2 and all("refused the round's outcome" in p for p in result.problems)
            leader = ordered[0].peer_id.to_base58()
            assert reported == [(leader, "outlier")] * 2
            assert [r.problems[0].startswith(f"refused the outcome of a round led by {leader[-8:]}")
                    for r in rounds] == [True, True]
            for (stage, _, sync), was in zip(stages[1:], before, strict=True):
                assert sync.round == 0  # still on the anchor it had
                assert all(torch.equal(got.detach(), want) for got, want in zip(stage.parameters(), was, strict=True))
            for follower in followers:
                await follower.stop()
    asyncio.run(main())


def test_a_leader_behind_the_stage_moves_nobody_and_names_the_replica_to_catch_up_from() -> None:
    """A leader that stalled while a stand-in led rounds: an outcome from its stale anchor would
    roll the others back (worker.replicas.leadership)."""
    async def main() -> None:
        async with loopback_peers(3) as peers:
            ordered = sorted(peers, key=lambda p: p.peer_id.to_base58())
            stages = [replica_stage(0.01 * (i + 1)) for i in range(3)]
            stages[1][2].round, stages[2][2].round = 5, 4  # they averaged without the leader
            followers = [await SyncFollower(p, KEY, s, sync, lambda e=e: e, lambda: 0).start()
                         for p, (s, e, sync) in zip(ordered[1:], stages[1:], strict=True)]
            before = [snapshot(s) for s, _, _ in stages]
            client = StageClient(ordered[0])
            replicas = [Replica(p.peer_id, tuple(await p.get_visible_maddrs())) for p in ordered[1:]]
            result = await lead_round(client, replicas, KEY, stages[0][0], stages[0][1], stages[0][2])
            assert result.newer == ordered[1].peer_id.to_base58(), result
            assert result.agreed == 1 and "behind the stage's anchor" in result.problems[0], result
            assert [sync.round for _, _, sync in stages] == [0, 5, 4]
            for (stage, _, _), was in zip(stages, before, strict=True):
                assert all(torch.equal(got.detach(), want) for got, want in zip(stage.parameters(), was, strict=True))
            for follower in followers:  # they drop the open round after HOLD_S
                await follower.stop()
    asyncio.run(main())
