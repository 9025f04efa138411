"""Which listed replicas a new replica downloads its stage's state from, and which it waits for."""

from __future__ import annotations

from hivemind.p2p import PeerID

from worker.pipeline.route import Replica
from worker.runtime.training import download_order


def replicas(n: int) -> list[Replica]:
    return [Replica(PeerID(bytes([i + 1]) * 34), ()) for i in range(n)]


def ids(rs: list[Replica]) -> set[str]:
    return {r.peer_id.to_base58() for r in rs}


def test_trained_replicas_come_first_and_only_they_are_waited_for() -> None:
    a, b, c, d = replicas(4)
    assert download_order([a, b, c, d], ids([c])) == [(c, True), (a, False), (b, False)]


def test_replicas_that_never_trained_are_not_waited_for_so_two_fresh_ones_do_not_stall_each_other() -> None:
    a, b = replicas(2)
    assert download_order([a, b], set()) == [(a, False), (b, False)]


def test_at_most_three_are_tried() -> None:
    rs = replicas(5)
    order = download_order(rs, ids(rs))
    assert order == [(r, True) for r in rs[:3]]
    assert download_order([], ids(rs)) == []
