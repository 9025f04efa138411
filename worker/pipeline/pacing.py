"""Pacing of bulk transfers, so that activations never queue behind them on a thin link.

An averaging round moves a whole stage's pseudo-gradient and update at once. Sent as fast as
the socket takes them, those bytes fill the link's queue (a home router's, or the tbf of the
test bed), and every activation of the pipeline then waits behind them: on a 20 Mbit/s link
a 1 MB update holds activations back by 0.4 s. A `Pacer` lets bulk frames out at a share of
the link's rate instead, in small frames, so the queue stays short and activations pass
between them; the round takes longer, but it runs beside the training (worker.replicas.
sync_round), so nobody waits for it.

One Pacer per worker: every bulk transfer of the worker draws on the same budget.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable

from hivemind.proto import runtime_pb2

BULK_LINK_SHARE = 0.5  # of the link's upload rate, for averaging rounds' bulk frames
BULK_CHUNK_BYTES = 64 * 1024  # frame size of paced transfers: ~26 ms of a 20 Mbit/s link


class Pacer:
    """A token bucket: `await wait(n)` returns when `n` more bytes keep the flow under the rate
    (after an idle spell, up to `burst_bytes` go at once)."""

    def __init__(self, bytes_per_s: float, *, burst_bytes: int = BULK_CHUNK_BYTES) -> None:
        if not bytes_per_s > 0:
            raise ValueError(f"a pacer needs a positive rate, got {bytes_per_s!r} B/s")
        self.bytes_per_s = float(bytes_per_s)
        self.burst_bytes = float(burst_bytes)
        self._tokens = self.burst_bytes  # bytes that may go now; negative: owed, to wait out
        self._at: float | None = None  # when _tokens was last brought up to date

    def delay(self, n: int, now: float) -> float:
        """Seconds to wait at `now` before `n` more bytes go, booking them (pure but for the booking)."""
        if self._at is not None:
            self._tokens = min(self.burst_bytes, self._tokens + (now - self._at) * self.bytes_per_s)
        self._at = now
        self._tokens -= n
        return max(0.0, -self._tokens / self.bytes_per_s)

    async def wait(self, n: int) -> None:
        pause = self.delay(n, time.monotonic())
        if pause > 0:
            await asyncio.sleep(pause)


def frame_bytes(pacer: Pacer | None, default: int) -> int:
    """Frame size for a transfer: small frames when paced, so activations fit between them."""
    return BULK_CHUNK_BYTES if pacer is not None else default


async def paced(frames: Iterable[runtime_pb2.ExpertRequest | runtime_pb2.ExpertResponse],
                pacer: Pacer | None) -> AsyncIterator[runtime_pb2.ExpertRequest | runtime_pb2.ExpertResponse]:
    """`frames` as an async iterator, each let out when `pacer` allows (at once without one)."""
    for frame in frames:
        if pacer is not None:
            await pacer.wait(frame.ByteSize())
        yield frame
