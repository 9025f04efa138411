"""The coordinator's hivemind DHT peer: volunteers bootstrap from it and find the coordinator.

The rendezvous record (protos/rendezvous.py) holds the gRPC endpoint and the run's config
hash under the shared coordinators key, subkey = run id; it expires unless refreshed, so a
dead coordinator stops being found.

The peer's private key is kept in the state dir (IDENTITY_FILE), so a restarted coordinator
has the same peer id: the `--peers` multiaddr volunteers were given (with the fixed DHT port)
still reaches it.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import hivemind
from hivemind.p2p import P2P, PeerID
from hivemind.utils.timed_storage import get_dht_time

from configs.child_signals import shielded_children
from protos.rendezvous import COORDINATORS_KEY, RECORD_TTL_S, RendezvousRecord

__all__ = ["IDENTITY_FILE", "RECORD_TTL_S", "CoordinatorDHT", "IdentityError", "RendezvousRecord", "ensure_identity"]

IDENTITY_FILE = "dht.key"


class IdentityError(Exception):
    """The state dir's peer key cannot be read or written."""


def ensure_identity(path: Path) -> PeerID:
    """The peer id of the key at `path`, writing a new key there first if there is none; the
    write goes through a temporary file, so a crash leaves either no key or a whole one."""
    if not path.exists():
        partial = path.with_name(f".{path.name}.partial")
        try:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
            P2P.generate_identity(str(partial))
            os.replace(partial, path)
        except OSError as err:
            raise IdentityError(f"cannot write the DHT key {path}: {err.strerror or err}") from None
    try:
        return PeerID.from_identity(path.read_bytes())
    except OSError as err:
        raise IdentityError(f"cannot read the DHT key {path}: {err.strerror}") from None
    except Exception:  # noqa: BLE001 - not a libp2p private key
        raise IdentityError(f"{path} is not a peer key file: move it away and a new one is created "
                            "(volunteers then need the new multiaddr)") from None


class CoordinatorDHT:
    """A DHT peer listening on `host:port` (0 = any free port) that publishes the rendezvous;
    with `identity`, a key file (see ensure_identity), its peer id survives restarts."""

    def __init__(self, host: str, port: int, initial_peers: list[str] | None = None,
                 identity: Path | None = None) -> None:
        # The DHT runs in a forked child. It must not act on Ctrl-C or a SIGTERM sent to the
        # whole process group: the coordinator shuts it down itself, after draining gRPC.
        with shielded_children(signal.SIGINT, signal.SIGTERM):
            self.dht = hivemind.DHT(
                initial_peers=initial_peers or [],
                host_maddrs=[f"/ip4/{host}/tcp/{port}"],
                identity_path=str(identity) if identity is not None else None,
                start=True,
                shutdown_timeout=1,
            )

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

