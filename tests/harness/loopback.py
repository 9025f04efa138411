"""Several P2P peers on 127.0.0.1 in one process: for tests, benchmarks and self-checks.

Each peer is its own p2pd daemon listening on its own TCP port, so calls between them
cross real sockets, libp2p's security handshake and stream multiplexing, exactly as
between machines, without the network's latency.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from hivemind.p2p import P2P

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


@contextlib.asynccontextmanager
async def loopback_peers(count: int) -> AsyncIterator[list[P2P]]:
    """`count` peers bootstrapped from the first; every daemon is shut down on exit."""
    if count < 1:
        raise ValueError(f"count must be >= 1 (got {count})")
    peers: list[P2P] = []
    try:
        peers.append(await P2P.create(host_maddrs=[LOOPBACK]))
        bootstrap = await peers[0].get_visible_maddrs()
        for _ in range(count - 1):
            peers.append(await P2P.create(host_maddrs=[LOOPBACK], initial_peers=bootstrap))
        yield peers
    finally:
        for peer in peers:
            await peer.shutdown()  # safe on a peer that was already shut down
