"""Whether a worker can be reached from outside: the coordinator dials back what it announced.

A worker behind a home router announces the private addresses its data plane listens on, and
nobody outside can connect to them: other workers cannot send it microbatches, fetch its state
or gather it into an averaging round. After each Join the coordinator tries a TCP connection to
every TCP address the worker announced, all at once and bounded (`PROBE_TIMEOUT_S`), and records
DIRECT when one accepts, UNREACHABLE when none does. A TCP connection shows that something
listens there, not that it is this worker's daemon: enough to tell a closed router from an open
port. A worker that announced no TCP address stays UNSPECIFIED: nothing to judge by. The verdict
goes to GetSwarm, /metrics and the worker's next heartbeat reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Iterable

from protos import swarmtrain_pb2 as pb

PROBE_TIMEOUT_S = 2.0
MAX_TARGETS = 8  # of the (at most 16) addresses a profile carries


def probe_targets(multiaddrs: Iterable[str], loopback: bool = False) -> list[tuple[str, int]]:
    """(host, port) of each `/ip4/A/tcp/P` or `/ip6/A/tcp/P` address (pure). Unspecified hosts are
    left out, and loopback ones unless `loopback` (the worker joined from this machine): a
    worker's 127.0.0.1 is the coordinator's own elsewhere."""
    targets = []
    for maddr in multiaddrs:
        parts = maddr.split("/")
        if len(parts) >= 5 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp" and parts[4].isdigit():
            try:
                address = ipaddress.ip_address(parts[2])
            except ValueError:
                continue
            if address.is_unspecified or (address.is_loopback and not loopback):
                continue
            target = (parts[2], int(parts[4]))
            if target not in targets:
                targets.append(target)
    return targets[:MAX_TARGETS]


async def _accepts(host: str, port: int, timeout: float) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def dial_back(multiaddrs: Iterable[str], loopback: bool = False, timeout: float = PROBE_TIMEOUT_S) -> int:
    """REACHABILITY_DIRECT if any announced TCP address accepts a connection, else UNREACHABLE;
    UNSPECIFIED when it announced none to try (nothing to judge by)."""
    targets = probe_targets(multiaddrs, loopback)
    if not targets:
        return pb.REACHABILITY_UNSPECIFIED
    answers = await asyncio.gather(*(_accepts(host, port, timeout) for host, port in targets))
    return pb.REACHABILITY_DIRECT if any(answers) else pb.REACHABILITY_UNREACHABLE
