"""Whether a worker can be reached from outside: the coordinator dials back what it announced.

A worker behind a home router announces the private addresses its data plane listens on, and
nobody outside can connect to them: other workers cannot send it microbatches, fetch its state
or gather it into an averaging round. After each Join the coordinator tries a TCP connection to
every TCP address the worker announced, all at once and bounded (`PROBE_TIMEOUT_S`), and records
DIRECT when one accepts, UNREACHABLE when none does. It dials the address the Join came from
(for a worker behind a router, the router), at each TCP port the worker announced: never a host
the worker names. A TCP connection shows that something listens there, not that it is this
worker's daemon: enough to tell a closed router from an open port. A worker that announced no TCP address stays UNSPECIFIED: nothing to judge by. The verdict
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


def probe_targets(multiaddrs: Iterable[str], observed: str) -> list[tuple[str, int]]:
    """(host, port) to try (pure): the address the worker's Join came from, at each TCP port it
    announced. Only the joiner's own address is dialled, never a host it names, so a Join cannot
    aim the coordinator at other machines; a worker behind a router is seen as the router, which
    is what answers there when a port is forwarded."""
    try:
        address = ipaddress.ip_address(observed)
    except ValueError:
        return []  # not an IP connection (a unix socket): nothing to dial
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    ports = []
    for maddr in multiaddrs:
        parts = maddr.split("/")
        if len(parts) >= 5 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp" and parts[4].isdigit():
            port = int(parts[4])
            if 0 < port < 65536 and port not in ports:
                ports.append(port)
    return [(str(address), port) for port in ports[:MAX_TARGETS]]


async def _accepts(host: str, port: int, timeout: float) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def dial_back(multiaddrs: Iterable[str], observed: str, timeout: float = PROBE_TIMEOUT_S) -> int:
    """REACHABILITY_DIRECT if the joiner's address accepts a connection at a port it announced,
    else UNREACHABLE; UNSPECIFIED when there is nothing to try."""
    targets = probe_targets(multiaddrs, observed)
    if not targets:
        return pb.REACHABILITY_UNSPECIFIED
    answers = await asyncio.gather(*(_accepts(host, port, timeout) for host, port in targets))
    return pb.REACHABILITY_DIRECT if any(answers) else pb.REACHABILITY_UNREACHABLE
