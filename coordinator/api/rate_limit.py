"""Per-address token buckets: how often one address may call `Join` (pure, with an injected clock)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

MAX_ADDRESSES = 65_536  # buckets kept; the least recently seen go first (a flood of addresses cannot fill memory)


class RateLimiter:
    """`rate` calls per second per key, in bursts of up to `burst`; rate 0 turns the limit off."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate, self.burst, self.clock = rate, max(1.0, burst), clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, when)

    def allow(self, key: str) -> bool:
        if self.rate <= 0:
            return True
        now = self.clock()
        tokens, when = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - when) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > MAX_ADDRESSES:
            self._buckets.popitem(last=False)
        return allowed

    def retry_after(self, key: str) -> float:
        """Seconds until `key` may call again (0 if it may now)."""
        tokens, _ = self._buckets.get(key, (self.burst, 0.0))
        return 0.0 if tokens >= 1.0 or self.rate <= 0 else (1.0 - tokens) / self.rate


def address_of(peer: str) -> str:
    """The host part of a gRPC peer string: 'ipv4:1.2.3.4:5678' -> '1.2.3.4', 'ipv6:[::1]:5' -> '::1'."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rpartition(":")[0]
        return host.strip("[]") or peer
    return peer  # unix sockets and the like: the whole string is the key
