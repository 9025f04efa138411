"""Where the remote stages of a pipeline live: stage index -> its replicas' peer ids and addresses.

The caller fills it (later from the coordinator's plan or the DHT); the driver only reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

from hivemind.p2p import PeerID
from hivemind.utils.multiaddr import Multiaddr


@dataclass(frozen=True)
class Replica:
    peer_id: PeerID
    maddrs: tuple[Multiaddr | str, ...] = ()  # empty: left to the daemon to find


@dataclass(frozen=True)
class StageRoute:
    index: int  # pipeline position; 0 is the driver's own stage and never routed
    key: str  # the name the stage is served under (StageServer's key)
    replicas: tuple[Replica, ...]

    @property
    def peer_ids(self) -> list[PeerID]:
        return [r.peer_id for r in self.replicas]


@dataclass(frozen=True)
class Route:
    """The remote stages 1..n-1 in pipeline order; the last one computes the loss."""

    stages: tuple[StageRoute, ...]

    def __post_init__(self) -> None:
        indices = [s.index for s in self.stages]
        if indices != list(range(1, len(self.stages) + 1)):
            raise ValueError(f"a route lists stages 1, 2, ... in order (got {indices})")
        keys = [s.key for s in self.stages]
        if len(set(keys)) != len(keys):
            raise ValueError(f"stage keys must be distinct (got {keys})")

    @property
    def last(self) -> StageRoute:
        return self.stages[-1]

    @property
    def middle(self) -> tuple[StageRoute, ...]:
        return self.stages[:-1]
