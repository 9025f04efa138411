"""The outer step of a stage's averaging rounds (worker.replicas.diloco), on plain tensors."""

from __future__ import annotations

import pytest
import torch

from worker.compression import CodecError, Encoded, decode_any
from worker.replicas.diloco import (
    OuterSettings,
    ReplicaSync,
    centered_clip,
    implausible_outcome,
    norm_of,
    pack,
    unpack,
)


def replicas(n: int, settings: OuterSettings, seed: int = 0) -> tuple[list[ReplicaSync], list[list[torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    anchor = [torch.randn(8, 16, generator=gen), torch.randn(16, generator=gen)]
    syncs = [ReplicaSync(anchor, settings) for _ in range(n)]
    trained = [[a + 0.01 * torch.randn(a.shape, generator=gen) for a in anchor] for _ in range(n)]
    return syncs, trained


def test_lr_one_without_momentum_is_the_mean_of_the_replicas() -> None:
    syncs, trained = replicas(3, OuterSettings(lr=1.0, momentum=0.0, codec="none"))
    update = syncs[0].outer_update([s.pseudo_gradient(p) for s, p in zip(syncs, trained, strict=True)])
    new = syncs[0].apply(update, 1)
    for got, *theirs in zip(new, *trained, strict=True):
        torch.testing.assert_close(got, torch.stack(theirs).mean(0), rtol=0, atol=1e-6)


def test_the_outer_step_is_nesterov_momentum_on_the_mean_pseudo_gradient() -> None:
    lr, mu = 0.7, 0.9
    syncs, trained = replicas(2, OuterSettings(lr=lr, momentum=mu, codec="none"))
    leader = syncs[0]
    anchor = [a.clone() for a in leader.anchor]
    g = [torch.stack([a - p for p, a in zip(ps, anchor, strict=True)][0:1]).mean(0) for ps in zip(*trained)]
    g = [torch.stack([anchor[i] - trained[r][i] for r in range(2)]).mean(0) for i in range(2)]
    new = leader.apply(leader.outer_update([s.pseudo_gradient(p) for s, p in zip(syncs, trained, strict=True)]), 1)
    for i in range(2):  # m = g, u = lr * (g + mu * m)
        torch.testing.assert_close(new[i], anchor[i] - lr * (1 + mu) * g[i], rtol=0, atol=1e-6)
    # a second round with a zero pseudo-gradient still moves by the momentum: u = lr * mu * (mu * m)
    second = leader.apply(leader.outer_update([leader.pseudo_gradient(new)]), 2)
    for i in range(2):
        torch.testing.assert_close(second[i], new[i] - lr * mu * mu * g[i], rtol=0, atol=1e-6)


def test_every_replica_applying_the_same_compressed_update_ends_bit_identical() -> None:
    settings = OuterSettings(lr=0.7, momentum=0.9, codec="blockwise_4bit", block_size=32)
    syncs, trained = replicas(3, settings)
    update = syncs[0].outer_update([s.pseudo_gradient(p) for s, p in zip(syncs, trained, strict=True)])
    parts, metas = pack(update)
    received = unpack(parts, metas, len(update))  # what a follower gets
    mine = syncs[0].apply(update, 1)
    for follower in syncs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(follower.apply(received, 1), mine, strict=True))


def test_unpack_refuses_layouts_that_do_not_add_up() -> None:
    parts = [torch.zeros(4), torch.zeros(2)]
    good = [{"meta": {"codec": "none"}, "parts": 1}, {"meta": {"codec": "none"}, "parts": 1}]
    assert [len(e.parts) for e in unpack(parts, good, 2)] == [1, 1]
    for metas, count in [(good, 3), ([{"meta": {}, "parts": 3}, good[1]], 2), ([{"parts": 1}, good[1]], 2),
                         ([{"meta": {}, "parts": 0}, good[1]], 2), ("junk", 2), ([{"meta": {}, "parts": -1}], 1)]:
        with pytest.raises(CodecError):
            unpack(parts, metas, count)
    assert isinstance(unpack([], [], 0), list) and Encoded([], {}).parts == []


def test_a_replica_alone_moves_the_anchor_to_its_parameters() -> None:
    syncs, trained = replicas(1, OuterSettings())
    alone = syncs[0]
    alone.adopt(trained[0])
    assert alone.round == 1
    assert all(torch.equal(a, t) for a, t in zip(alone.anchor, trained[0], strict=True))
    trained[0][0].add_(1.0)  # a copy: training on does not move the anchor
    assert not torch.equal(alone.anchor[0], trained[0][0])


def test_one_lying_replica_of_four_barely_moves_the_stage_and_is_named() -> None:
    gen = torch.Generator().manual_seed(5)
    anchor = [torch.randn(8, 16, generator=gen), torch.randn(16, generator=gen)]
    # honest replicas trained the same model on similar data: a shared direction, their own noise
    shared = [0.01 * torch.randn(a.shape, generator=gen) for a in anchor]
    syncs = [ReplicaSync(anchor, OuterSettings(lr=1.0, momentum=0.0, codec="none")) for _ in range(4)]
    trained = [[a - d - 0.002 * torch.randn(a.shape, generator=gen) for a, d in zip(anchor, shared, strict=True)]
               for _ in range(4)]
    leader = syncs[0]
    honest = [s.pseudo_gradient(p) for s, p in zip(syncs[:3], trained[:3], strict=True)]
    honest_mean = [torch.stack([decode_any(h[i]) for h in honest]).mean(0) for i in range(2)]
    liar = [Encoded([-1000 * decode_any(e).reshape(-1)], dict(e.meta))  # sign-flipped, x1000
            for e in syncs[3].pseudo_gradient(trained[3])]
    new = leader.apply(leader.outer_update([*honest, liar]), 1)
    assert leader.outliers == [3]
    moved = torch.cat([(a - n).reshape(-1) for a, n in zip(anchor, new, strict=True)])
    wanted = torch.cat([m.reshape(-1) for m in honest_mean])
    # within a fifth of the honest step of where the honest replicas alone would take it; the
    # plain mean would go ~250x the honest step the wrong way
    assert float((moved - wanted).norm()) < 0.2 * float(wanted.norm())


def test_when_only_the_liar_answers_in_a_large_stage_the_leader_is_not_dragged() -> None:
    gen = torch.Generator().manual_seed(7)
    anchor = [torch.randn(8, 16, generator=gen), torch.randn(16, generator=gen)]
    syncs = [ReplicaSync(anchor, OuterSettings(lr=1.0, momentum=0.0, codec="none")) for _ in range(2)]
    trained = [[a - 0.01 * torch.randn(a.shape, generator=gen) for a in anchor] for _ in range(2)]
    own = syncs[0].pseudo_gradient(trained[0])
    own_flat = torch.cat([decode_any(e).reshape(-1) for e in own])
    liar = [Encoded([-1000 * decode_any(e).reshape(-1)], dict(e.meta)) for e in syncs[1].pseudo_gradient(trained[1])]
    # the other two replicas of the four were late: two answers, but a stage of four
    new = syncs[0].apply(syncs[0].outer_update([own, liar], stage_replicas=4), 1)
    assert syncs[0].outliers == [1]
    moved = torch.cat([(a - n).reshape(-1) for a, n in zip(anchor, new, strict=True)])
    # the liar is left out: the leader keeps its own step; the plain mean would go ~500x the wrong way
    torch.testing.assert_close(moved, own_flat, rtol=0, atol=1e-6)
    # a stage of two keeps the plain mean: neither replica can be told from the other
    syncs[0].reset(anchor, 0)
    plain = syncs[0].apply(syncs[0].outer_update([syncs[0].pseudo_gradient(trained[0]), liar], stage_replicas=2), 1)
    assert syncs[0].outliers == []
    assert float(torch.cat([(a - n).reshape(-1) for a, n in zip(anchor, plain, strict=True)]).norm()) > \
        100 * float(own_flat.norm())


def test_with_honest_replicas_centered_clip_is_close_to_the_mean() -> None:
    syncs, trained = replicas(4, OuterSettings(lr=1.0, momentum=0.0, codec="none"), seed=6)
    grads = [s.pseudo_gradient(p) for s, p in zip(syncs, trained, strict=True)]
    decoded = [[decode_any(e) for e in g] for g in grads]
    clipped, outliers = centered_clip(decoded)
    assert outliers == []
    for c, *ts in zip(clipped, *decoded, strict=True):
        mean = torch.stack(ts).mean(0)
        assert float((c - mean).norm()) < 0.35 * float(mean.norm())


def drift(anchor: list[torch.Tensor], params: list[torch.Tensor]) -> float:
    return norm_of([a - p for a, p in zip(anchor, params, strict=True)])


def test_a_followers_check_passes_honest_outcomes_and_refuses_a_lying_leaders() -> None:
    settings = OuterSettings(lr=0.7, momentum=0.9, codec="blockwise_8bit")
    syncs, trained = replicas(3, settings, seed=3)
    honest = syncs[0].outer_update([s.pseudo_gradient(p) for s, p in zip(syncs, trained, strict=True)])
    follower = syncs[1]
    own = drift(follower.anchor, trained[1])
    assert follower.moved_norm == pytest.approx(own)  # what it sent is what it trained
    assert implausible_outcome(follower.anchor, follower.propose(honest), own, settings) is None
    # the same round from a leader that sends its move sign-flipped and 1000x larger, as an
    # update and as a whole anchor (for followers behind), and keeps the honest one itself
    liar = ReplicaSync(syncs[0].anchor, settings, lie_scale=-1000)
    old = liar.anchor
    kept = liar.outer_update([s.pseudo_gradient(p) for s, p in zip(syncs, trained, strict=True)])
    lying, lying_anchor = liar.outgoing(kept, liar.apply(kept, 1), old)
    assert implausible_outcome(old, liar.anchor, own, settings) is None  # what it keeps is honest
    doubt = implausible_outcome(follower.anchor, follower.propose(lying), own, settings)
    assert doubt is not None and "its parameters' norm" in doubt, doubt
    assert implausible_outcome(follower.anchor, lying_anchor, own, settings) is not None
    # refusing changes nothing: propose leaves the anchor and round where they were
    assert follower.round == 0 and all(torch.equal(a, b) for a, b in zip(follower.anchor, syncs[2].anchor, strict=True))
    # non-finite outcomes are refused whatever their size
    assert implausible_outcome(follower.anchor, [a * float("nan") for a in follower.anchor], own,
                               settings) == "the round's outcome is not finite"


def test_a_replica_that_barely_trained_still_takes_an_honest_leaders_outcome() -> None:
    # it joined a step ago (or runs on a slow card): the others moved 30x further than it did,
    # which the drift rule alone would refuse; the anchor-norm rule lets the honest round through
    settings = OuterSettings(lr=1.0, momentum=0.0, codec="none")
    anchor = [torch.ones(64, 64)]
    others = [[anchor[0] - 0.03 * torch.randn(64, 64, generator=torch.Generator().manual_seed(i))] for i in range(2)]
    barely = [anchor[0] - 0.001 * torch.randn(64, 64, generator=torch.Generator().manual_seed(9))]
    outcome = [torch.stack([o[0] for o in others]).mean(0)]
    assert implausible_outcome(anchor, outcome, drift(anchor, barely), settings) is None
    assert implausible_outcome(anchor, outcome, 0.0, settings) is None  # and one that did not train at all


def test_a_whole_anchor_after_missed_rounds_gets_each_rounds_allowance() -> None:
    settings = OuterSettings(lr=1.0, momentum=0.0, codec="none")
    anchor = [torch.full((32, 32), 0.01)]
    ahead = [anchor[0] + 0.03]  # three rounds' honest moves, each about the anchor's norm
    assert implausible_outcome(anchor, ahead, 0.0, settings, rounds=1) is not None
    assert implausible_outcome(anchor, ahead, 0.0, settings, rounds=4) is None


def test_a_replica_that_sent_a_scaled_pseudo_gradient_measures_itself_by_what_it_sent() -> None:
    # in a stage of two the mean carries a x-1000 follower's own lie back to it: by its real
    # drift that is implausible, by what it sent it is not, so it does not report an honest leader
    settings = OuterSettings(lr=1.0, momentum=0.0, codec="none")
    syncs, trained = replicas(2, settings, seed=5)
    liar = ReplicaSync(syncs[1].anchor, settings, lie_scale=-1000)
    outcome = syncs[0].outer_update([syncs[0].pseudo_gradient(trained[0]), liar.pseudo_gradient(trained[1])])
    proposed = liar.propose(outcome)
    assert liar.moved_norm == pytest.approx(1000 * drift(liar.anchor, trained[1]), rel=1e-5)
    assert implausible_outcome(liar.anchor, proposed, drift(liar.anchor, trained[1]), settings) is not None
    assert implausible_outcome(liar.anchor, proposed, liar.moved_norm, settings) is None


def test_a_lying_leader_alone_on_its_anchor_steps_by_its_honest_training_and_still_sends_its_lie() -> None:
    # its followers refused its last outcome, so none is on its anchor: its own pseudo-gradient is
    # the whole round. Lying to itself it would jump 1000x back and stop training (and lying);
    # as an attacker that means to stay in the swarm, it keeps itself honest
    settings = OuterSettings(lr=1.0, momentum=0.0, codec="none")
    syncs, trained = replicas(1, settings, seed=7)
    liar = ReplicaSync(syncs[0].anchor, settings, lie_scale=-1000)
    old = liar.anchor
    # what it sends as a participant in another's round is the lie
    sent = decode_any(liar.pseudo_gradient(trained[0])[0]).reshape(old[0].shape)
    assert torch.allclose(sent, -1000 * (old[0] - trained[0][0]), rtol=1e-4, atol=1e-4)
    kept = liar.outer_update([liar.pseudo_gradient(trained[0], own=True)])
    new = liar.apply(kept, 1)
    assert all(torch.allclose(n, t, atol=1e-6) for n, t in zip(new, trained[0], strict=True))  # where it trained
    _, lying_anchor = liar.outgoing(kept, new, old)
    assert implausible_outcome(old, lying_anchor, drift(old, trained[0]), settings) is not None
