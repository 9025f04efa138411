"""The worker's one hivemind P2P daemon, started before the worker joins: its peer id and addresses
go into the profile, and the coordinator lists them in GetSwarm, where the other stages find us."""

from __future__ import annotations

import signal
from pathlib import Path

from hivemind.p2p import P2P

from configs.child_signals import shielded_children

MAX_MULTIADDRS = 16  # what the coordinator accepts in a profile


def listen_maddr(host: str, port: int = 0) -> str:
    return f"/ip6/{host}/tcp/{port}" if ":" in host else f"/ip4/{host}/tcp/{port}"


class DataPlane:
    """This worker's P2P daemon, listening on `host` on a free port, for as long as the worker runs."""

    def __init__(self, p2p: P2P, multiaddrs: list[str]) -> None:
        self.p2p = p2p
        self.peer_id = p2p.peer_id.to_base58()
        self.multiaddrs = multiaddrs

    @classmethod
    async def start(cls, host: str, identity: Path | None = None,
                    public: tuple[str, int] | None = None) -> DataPlane:
        """`public`: (address, port) of a port forwarded to this machine: listen on that port and
        announce only that address (worker --public-addr), the one others can reach."""
        # Ctrl-C reaches the whole process group: the daemon must leave it to us (SIGTERM it
        # keeps, so that shutting it down still works).
        with shielded_children(signal.SIGINT):
            # an identity file keeps the peer id (and with it bans and reports) across restarts
            p2p = await P2P.create(host_maddrs=[listen_maddr(host, public[1] if public else 0)],
                                   announce_maddrs=[listen_maddr(*public)] if public else None,
                                   identity_path=str(identity) if identity is not None else None)
        try:
            visible = [str(m) for m in await p2p.get_visible_maddrs()]
        except BaseException:
            await p2p.shutdown()
            raise
        return cls(p2p, visible[:MAX_MULTIADDRS])

    async def shutdown(self) -> None:
        await self.p2p.shutdown()
