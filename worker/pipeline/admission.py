"""Who may call a stage's compute and averaging handlers: the workers the coordinator admitted.

Knowing a stage's peer id and address is not enough to feed it activations or pseudo-gradients:
the caller's libp2p peer id (authenticated by the transport's handshake) must belong to an
active worker in the coordinator's GetSwarm. The list is re-read every few seconds, and at once
(at most every MIN_REFRESH_S) when an unknown peer calls, so a worker that just joined is not
turned away. State downloads stay open: reading the model changes nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

REFRESH_S = 3.0
MIN_REFRESH_S = 0.5

FetchAdmitted = Callable[[], Awaitable[set[str]]]


class Admission:
    """`await admits(peer_id_base58)`; a failed read of the list keeps the last one."""

    def __init__(self, fetch: FetchAdmitted, clock: Callable[[], float] = time.monotonic) -> None:
        self.fetch, self.clock = fetch, clock
        self.allowed: set[str] = set()
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def admits(self, peer: str) -> bool:
        age = self.clock() - self._read_at
        if age > REFRESH_S or (peer not in self.allowed and age > MIN_REFRESH_S):
            await self._refresh()
        return peer in self.allowed

    async def _refresh(self) -> None:
        async with self._lock:
            if self.clock() - self._read_at <= MIN_REFRESH_S:
                return  # another call refreshed meanwhile
            try:
                self.allowed = set(await self.fetch())
            except Exception:  # noqa: BLE001 - coordinator away: keep the last list
                pass
            self._read_at = self.clock()
