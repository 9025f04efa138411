"""Per-address join limits (coordinator.api.rate_limit), with a controlled clock."""

from __future__ import annotations

from coordinator.api.rate_limit import MAX_ADDRESSES, RateLimiter, address_of


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_the_sustained_rate_per_address() -> None:
    clock = Clock()
    limit = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limit.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limit.allow("b")  # another address has its own bucket
    assert limit.retry_after("a") == 0.5
    clock.now += 0.5  # one token back at 2/s
    assert limit.allow("a") and not limit.allow("a")
    clock.now += 60  # refills to the burst, never beyond
    assert [limit.allow("a") for _ in range(4)] == [True, True, True, False]


def test_rate_zero_is_off_and_memory_is_bounded() -> None:
    clock = Clock()
    assert all(RateLimiter(0, 1, clock).allow("a") for _ in range(1000))
    limit = RateLimiter(1.0, 1, clock)
    for i in range(MAX_ADDRESSES + 10):
        limit.allow(str(i))
    assert len(limit._buckets) == MAX_ADDRESSES
    assert limit.allow("0")  # the oldest were forgotten: a fresh bucket


def test_address_of_grpc_peers() -> None:
    assert address_of("ipv4:203.0.113.5:50123") == "203.0.113.5"
    assert address_of("ipv6:[2001:db8::1]:443") == "2001:db8::1"
    assert address_of("unix:/tmp/sock") == "unix:/tmp/sock"
