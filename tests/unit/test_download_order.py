"""Which listed replicas a new replica downloads its stage's state from, and which it waits for."""

from __future__ import annotations

from hivemind.p2p import PeerID

from worker.pipeline.route import Replica
from worker.runtime.policy import download_order


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


def test_replicas_said_to_serve_come_first_trained_ones_before_the_others() -> None:
    a, b, c, d = replicas(4)
    assert download_order([a, b, c, d], ids([a, c]), ids([b, c])) == [(c, True), (b, False), (a, True)]


def test_a_replica_that_neither_serves_nor_trained_is_never_asked_once_some_serve() -> None:
    a, b, c = replicas(3)
    assert download_order([a, b, c], set(), ids([c])) == [(c, False)]
    assert download_order([a, b, c], ids([c]), ids([c])) == [(c, True)]


def test_where_none_is_said_to_serve_the_order_is_as_without_the_field() -> None:
    a, b, c, d = replicas(4)
    for serving in (set(), ids(replicas(6)[4:])):  # none of ours: a coordinator that does not fill it
        assert download_order([a, b, c, d], ids([c]), serving) == download_order([a, b, c, d], ids([c]))


def test_at_most_three_are_tried_serving_ones_first() -> None:
    rs = replicas(5)
    order = download_order(rs, ids(rs), ids(rs[2:]))
    assert [r for r, _ in order] == rs[2:]
