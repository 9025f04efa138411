"""The coordinator's hivemind DHT peer: volunteers bootstrap from it and find the coordinator.

The rendezvous record (protos/rendezvous.py) holds the gRPC endpoint and the run's config
hash under the shared coordinators key, subkey = run id; it expires unless refreshed, so a
dead coordinator stops being found.
"""

from __future__ import annotations

import signal

import hivemind
from hivemind.utils.timed_storage import get_dht_time

from protos.rendezvous import COORDINATORS_KEY, RECORD_TTL_S, RendezvousRecord

__all__ = ["RECORD_TTL_S", "CoordinatorDHT", "RendezvousRecord"]


class CoordinatorDHT:
    """A DHT peer listening on `host:port` (0 = any free port) that publishes the rendezvous."""

    def __init__(self, host: str, port: int, initial_peers: list[str] | None = None) -> None:
        # The DHT runs in a forked child. It must not act on Ctrl-C or a SIGTERM sent to the
        # whole process group: the coordinator shuts it down itself, after draining gRPC.
        # Call from the main thread (signal dispositions can only be changed there).
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.dht = hivemind.DHT(
                initial_peers=initial_peers or [],
                host_maddrs=[f"/ip4/{host}/tcp/{port}"],
                start=True,
                shutdown_timeout=1,
            )
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def multiaddrs(self) -> list[str]:
        """Addresses volunteers can pass to `worker --peers`, most useful first."""
        addrs = [str(a) for a in self.dht.get_visible_maddrs()]
        return sorted(addrs, key=lambda a: ("/127." in a, a))

    async def publish(self, run_id: str, record: RendezvousRecord, ttl_s: float = RECORD_TTL_S) -> bool:
        stored = self.dht.store(
            COORDINATORS_KEY, record.to_value(), expiration_time=get_dht_time() + ttl_s,
            subkey=run_id, return_future=True,
        )
        return bool(await stored)

    def shutdown(self) -> None:
        # A SIGTERM sent to the whole process group (systemd, `timeout`) also reaches the DHT
        # child, which then may never answer a polite shutdown: make sure it is gone.
        self.dht.shutdown()
        self.dht.join(timeout=2)
        if self.dht.is_alive():
            self.dht.kill()
            self.dht.join(timeout=2)

