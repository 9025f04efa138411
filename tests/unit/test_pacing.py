"""The bulk-transfer pacer: a token bucket that keeps a flow at its rate, with one burst after idling."""

from __future__ import annotations

import asyncio

import pytest
from hivemind.proto import runtime_pb2

from worker.pipeline.pacing import BULK_CHUNK_BYTES, Pacer, frame_bytes, paced


def test_a_burst_goes_at_once_then_the_rate_holds() -> None:
    pacer = Pacer(1000.0, burst_bytes=500)
    assert pacer.delay(500, now=10.0) == 0.0  # the bucket starts full
    assert pacer.delay(1000, now=10.0) == pytest.approx(1.0)  # then each byte waits its turn
    assert pacer.delay(1000, now=11.0) == pytest.approx(1.0)  # it went at 11: the next at 12
    # over a long run the flow is the rate: 10 kB take 10 s after the burst
    pacer = Pacer(1000.0, burst_bytes=500)
    waits = [pacer.delay(100, now=0.0) for _ in range(105)]
    assert waits[4] == 0.0 and waits[-1] == pytest.approx(10.0)


def test_an_idle_spell_refills_no_more_than_one_burst() -> None:
    pacer = Pacer(1000.0, burst_bytes=500)
    pacer.delay(500, now=0.0)
    assert pacer.delay(500, now=100.0) == 0.0  # refilled, but only to the burst
    assert pacer.delay(500, now=100.0) == pytest.approx(0.5)


def test_a_pacer_needs_a_positive_rate() -> None:
    with pytest.raises(ValueError, match="positive rate"):
        Pacer(0.0)
    # paced transfers go in small frames; unpaced ones keep the caller's size
    assert frame_bytes(Pacer(1.0), 512 * 1024) == BULK_CHUNK_BYTES and frame_bytes(None, 512 * 1024) == 512 * 1024


def test_paced_frames_arrive_in_order_and_no_faster_than_the_rate() -> None:
    frames = [runtime_pb2.ExpertResponse(metadata=bytes(990)) for _ in range(4)]
    size = frames[0].ByteSize()

    async def main() -> tuple[list[runtime_pb2.ExpertResponse], float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        out = [f async for f in paced(frames, Pacer(size * 20.0, burst_bytes=size))]
        return out, loop.time() - started

    out, took = asyncio.run(main())
    assert out == frames
    assert took >= 3 / 20 - 0.01  # the first frame at once, three more at 1/20 s each
