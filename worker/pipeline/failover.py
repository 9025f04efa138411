"""Choosing among a stage's replicas, and moving a call to another replica when one fails.

`ReplicaPicker` draws a replica at random with probability proportional to its measured
throughput (an EMA of samples/s over its recent calls), as SWARM's stochastic wiring does:
fast replicas get more work, slow ones still get some, so their estimates stay current and
no single replica takes every call. A replica that just failed sits out a cool-down: a short
one if it is alive but does not serve the stage yet (it is still downloading its state, as
every new replica does), else a long one.

A replica whose stream closed before any answer (`NoAnswer`) is asked once more before the call
moves on: it took the stream, so it is up, and on a busy machine such a stream often closed
before the request reached its handler. Where the first ask was computed after all, the stage
takes the microbatch once (worker.pipeline.executor), so asking again never counts it twice.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TypeVar

from hivemind.p2p import P2PDaemonError, PeerID

from worker.pipeline.errors import NoAnswer, NoReplicaAvailable, RetryableError

T = TypeVar("T")

# What one replica can get wrong without the request being wrong: it died (the daemon cannot
# dial it, the stream breaks), it is too slow, or it answered garbage.
RETRYABLE: tuple[type[BaseException], ...] = (
    RetryableError,
    P2PDaemonError,
    asyncio.TimeoutError,
    ConnectionError,
    asyncio.IncompleteReadError,
    OSError,
)


# The daemon's answer when the peer is up but has no handler for the call's protocol (yet): it
# comes at once, so asking again soon costs little, while a replica out of the rotation for the
# long cool-down leaves its compute idle (a 4-worker swarm ran on 3 for its first 10 s).
NOT_SERVING_YET = "protocols not supported"
NOT_SERVING_COOLDOWN_S = 1.0


def not_serving_yet(err: BaseException) -> bool:
    """Whether `err` says the peer is up but has no handler for the call yet (pure)."""
    return isinstance(err, P2PDaemonError) and NOT_SERVING_YET in str(err)


def cooldown_after(err: BaseException, cooldown_s: float) -> float:
    """How long a replica sits out after failing a call with `err` (pure)."""
    if not_serving_yet(err):
        return min(NOT_SERVING_COOLDOWN_S, cooldown_s)
    return cooldown_s


class ReplicaPicker:
    """The replica with the fewest of this driver's calls in flight, throughput-weighted among
    equals, with a cool-down for those that just failed.

    Picking at random per micro-batch sent two of a driver's micro-batches to the same replica
    while another sat idle (tiny, 2 stages x 3 replicas: the rate model's balanced pipeline
    forecast 1.24x what the swarm trained); counting its own calls in flight is what a driver
    knows without asking anyone.
    """

    def __init__(
        self,
        *,
        ema_alpha: float = 0.3,
        cooldown_s: float = 10.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < ema_alpha <= 1:
            raise ValueError(f"ema_alpha must be in (0, 1] (got {ema_alpha})")
        self.ema_alpha, self.cooldown_s = ema_alpha, cooldown_s
        self._rng = rng or random.Random()
        self._clock = clock
        self._rate: dict[PeerID, float] = {}  # samples/s
        self._banned_until: dict[PeerID, float] = {}
        self._in_flight: dict[PeerID, int] = {}  # this driver's calls each replica is working on

    def throughput(self, peer: PeerID) -> float | None:
        return self._rate.get(peer)

    def cooling_down(self, peer: PeerID) -> bool:
        return self._banned_until.get(peer, float("-inf")) > self._clock()

    def record_success(self, peer: PeerID, samples: int, seconds: float) -> None:
        rate = samples / max(seconds, 1e-6)
        old = self._rate.get(peer)
        self._rate[peer] = rate if old is None else old + self.ema_alpha * (rate - old)
        self._banned_until.pop(peer, None)

    def started(self, peer: PeerID) -> None:
        self._in_flight[peer] = self._in_flight.get(peer, 0) + 1

    def finished(self, peer: PeerID) -> None:
        left = self._in_flight.get(peer, 0) - 1
        if left > 0:
            self._in_flight[peer] = left
        else:
            self._in_flight.pop(peer, None)

    def record_failure(self, peer: PeerID, err: BaseException) -> None:
        """`peer` failed a call with `err`: it sits out `cooldown_after(err)`."""
        self._banned_until[peer] = self._clock() + cooldown_after(err, self.cooldown_s)

    def choose(self, replicas: Sequence[PeerID], exclude: Collection[PeerID] = ()) -> PeerID | None:
        """A replica not in `exclude`, preferring those not cooling down; None when none is left.

        Cooling replicas are a last resort rather than never: with a single replica, one
        timeout must not stall its stage for the whole cool-down.
        """
        candidates = [p for p in dict.fromkeys(replicas) if p not in exclude]
        ready = [p for p in candidates if not self.cooling_down(p)]
        pool = ready or candidates
        if not pool:
            return None
        least = min(self._in_flight.get(p, 0) for p in pool)
        pool = [p for p in pool if self._in_flight.get(p, 0) == least]
        known = [self._rate[p] for p in pool if p in self._rate]
        # an unmeasured replica counts as the fastest known one, so it gets tried and measured
        default = max(known) if known else 1.0
        weights = [max(self._rate.get(p, default), 1e-9) for p in pool]
        return self._rng.choices(pool, weights=weights)[0]


async def call_with_failover(
    replicas: Sequence[PeerID],
    fn: Callable[[PeerID], Awaitable[T]],
    *,
    picker: ReplicaPicker,
    samples: int = 1,
    what: str = "call",
    on_failure: Callable[[PeerID, BaseException], None] | None = None,
    on_ask_again: Callable[[PeerID, BaseException], None] | None = None,
) -> T:
    """`await fn(peer)` on a picked replica, trying the next one on a retryable failure.

    Each replica is tried at most once per call, or twice after a `NoAnswer` (`on_ask_again`
    hears of those). Non-retryable errors (a `RequestRejected`, a bug) propagate at once: every
    replica would fail them the same way.
    """
    tried: dict[PeerID, BaseException] = {}
    asked_again: set[PeerID] = set()
    peer: PeerID | None = None
    while True:
        if peer is None:
            peer = picker.choose(replicas, exclude=tried)
        if peer is None:
            failures = "; ".join(f"{p.to_base58()[-8:]}: {_describe(e)}" for p, e in tried.items())
            raise NoReplicaAvailable(
                f"{what}: no replica left of {len(set(replicas))} ({failures or 'none listed'})"
            )
        started, called = time.perf_counter(), peer
        picker.started(called)
        try:
            result = await fn(peer)
        except RETRYABLE as err:
            if isinstance(err, NoAnswer) and peer not in asked_again:
                asked_again.add(peer)
                if on_ask_again is not None:
                    on_ask_again(peer, err)
                continue  # the same peer, once
            picker.record_failure(peer, err)
            tried[peer] = err
            if on_failure is not None:
                on_failure(peer, err)
            peer = None
            continue
        finally:
            picker.finished(called)
        picker.record_success(peer, samples, time.perf_counter() - started)
        return result


def _describe(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text[:160]}" if text else type(err).__name__
