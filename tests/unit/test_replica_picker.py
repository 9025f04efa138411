"""How long a replica that failed a call sits out: briefly when it is up but does not serve the
stage yet, the full cool-down when it cannot be reached or does not answer."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import pytest
from hivemind.p2p import PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure

from worker.pipeline.errors import NoAnswer, NoReplicaAvailable
from worker.pipeline.failover import NOT_SERVING_COOLDOWN_S, ReplicaPicker, call_with_failover, cooldown_after

NOT_YET = ControlFailure("Connect failed. msg=failed to negotiate protocol: protocols not supported: [x.forward]")
UNREACHABLE = ControlFailure("Connect failed. msg=failed to dial: no addresses")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def peers(n: int) -> list[PeerID]:
    return [PeerID(bytes([i + 1]) * 34) for i in range(n)]


def test_cooldown_depends_on_why_the_call_failed() -> None:
    assert cooldown_after(NOT_YET, 10.0) == NOT_SERVING_COOLDOWN_S
    assert cooldown_after(UNREACHABLE, 10.0) == 10.0
    assert cooldown_after(asyncio.TimeoutError(), 10.0) == 10.0
    assert cooldown_after(NOT_YET, 0.5) == 0.5  # never longer than the picker's own cool-down


def test_a_replica_not_serving_yet_is_back_in_the_rotation_after_a_second() -> None:
    clock = Clock()
    picker = ReplicaPicker(cooldown_s=10.0, clock=clock, rng=random.Random(0))
    late, dead = peers(2)
    picker.record_failure(late, NOT_YET)
    picker.record_failure(dead, UNREACHABLE)
    assert picker.cooling_down(late) and picker.cooling_down(dead)
    clock.now = NOT_SERVING_COOLDOWN_S + 0.01
    assert not picker.cooling_down(late) and picker.cooling_down(dead)
    assert {picker.choose([late, dead]) for _ in range(20)} == {late}
    clock.now = 10.01
    assert not picker.cooling_down(dead)


def test_failover_passes_the_error_on_to_the_cooldown() -> None:
    clock = Clock()
    picker = ReplicaPicker(cooldown_s=10.0, clock=clock, rng=random.Random(0))
    late, live = peers(2)

    async def call(peer: PeerID) -> str:
        if peer == late:
            raise NOT_YET
        return "ok"

    for _ in range(10):  # until the late one was picked first once
        assert asyncio.run(call_with_failover([late, live], call, picker=picker)) == "ok"
        if picker.cooling_down(late):
            break
    else:
        pytest.fail("the late replica was never picked")
    clock.now += NOT_SERVING_COOLDOWN_S + 0.01
    assert not picker.cooling_down(late)


def test_a_replica_that_closed_the_stream_unanswered_is_asked_once_more_before_the_call_moves_on() -> None:
    picker = ReplicaPicker(cooldown_s=10.0, rng=random.Random(0))
    only, other = peers(2)
    asks: list[PeerID] = []
    again: list[PeerID] = []

    def calling(unanswered: int) -> Callable[[PeerID], Awaitable[str]]:  # its first `unanswered` asks close unanswered
        async def call(peer: PeerID) -> str:
            asks.append(peer)
            if len(asks) <= unanswered:
                raise NoAnswer(f"{peer}: backward stream closed without an answer")
            return "ok"
        return call

    def heard(peer: PeerID, err: BaseException) -> None:
        again.append(peer)

    assert asyncio.run(call_with_failover([only], calling(1), picker=picker, on_ask_again=heard)) == "ok"
    assert asks == [only, only] and again == [only]
    assert not picker.cooling_down(only)  # a re-ask that got its answer is no failure

    asks.clear()
    with pytest.raises(NoReplicaAvailable, match="no replica left of 1"):
        asyncio.run(call_with_failover([only], calling(2), picker=picker))
    assert asks == [only, only] and picker.cooling_down(only)  # twice unanswered: it sits out

    asks.clear()
    fresh = ReplicaPicker(cooldown_s=10.0, rng=random.Random(0))
    assert asyncio.run(call_with_failover([only, other], calling(2), picker=fresh)) == "ok"
    first, second = asks[0], ({only, other} - {asks[0]}).pop()
    assert asks == [first, first, second]  # twice unanswered: the call moves to the next replica


def test_a_driver_sends_its_next_call_to_a_replica_it_is_not_already_waiting_on() -> None:
    """Random picks sent two of a driver's micro-batches to one replica while another idled: the
    picker takes the replicas with the fewest of its calls in flight, the fastest only among them."""
    a, b, c = peers(3)
    picker = ReplicaPicker(rng=random.Random(0))
    picker.record_success(a, 100, 1.0)  # a is ten times faster than b and c
    picker.record_success(b, 10, 1.0)
    picker.record_success(c, 10, 1.0)
    picker.started(a)
    assert {picker.choose([a, b, c]) for _ in range(50)} == {b, c}
    picker.started(b)
    picker.started(c)
    picker.started(c)
    assert {picker.choose([a, b, c]) for _ in range(50)} == {a, b}  # one call each on a and b, two on c
    picker.finished(a)
    assert {picker.choose([a, b, c]) for _ in range(50)} == {a}


def test_failover_counts_a_call_in_flight_until_it_ends_however_it_ends() -> None:
    a, b = peers(2)
    picker = ReplicaPicker(rng=random.Random(1))
    seen: list[PeerID] = []

    async def main() -> None:
        async def fails_once(peer: PeerID) -> str:
            seen.append(peer)
            if len(seen) == 1:
                assert picker.choose([a, b]) != peer  # while this call runs, the other replica is preferred
                raise UNREACHABLE
            return "ok"  # (the failed replica cools down: the choice is this one whatever runs)

        assert await call_with_failover([a, b], fails_once, picker=picker) == "ok"

    asyncio.run(main())
    assert len(seen) == 2 and seen[0] != seen[1]
    picker.record_success(seen[1], 1, 1.0)
    assert picker.choose([seen[1]]) == seen[1] and not picker._in_flight  # nothing left counted
