"""The rendezvous record: how a worker that knows only a DHT peer finds its coordinator.

Every coordinator publishes one record under the well-known DHT key `COORDINATORS_KEY`,
with its run id as the subkey, so a single lookup lists every run reachable through the
peers a volunteer was given. Records expire unless refreshed: a dead coordinator stops
being found. Both sides depend on this layout, which is why it lives with the wire contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # hivemind is heavy: importing this module must not load it
    import hivemind

COORDINATORS_KEY = "swarmtrain/coordinators"
RECORD_TTL_S = 60.0  # the coordinator re-publishes every third of this


@dataclass(frozen=True)
class RendezvousRecord:
    endpoint: str  # host:port of the coordinator's gRPC server
    config_hash: str
    software_version: str
    tls: bool

    def to_value(self) -> dict[str, object]:
        return {"endpoint": self.endpoint, "config_hash": self.config_hash,
                "software_version": self.software_version, "tls": self.tls}

    @classmethod
    def from_value(cls, value: Any) -> RendezvousRecord | None:
        """The record stored by `to_value`, or None for anything else found under the key."""
        if not isinstance(value, dict):
            return None
        try:
            return cls(str(value["endpoint"]), str(value["config_hash"]),
                       str(value["software_version"]), bool(value["tls"]))
        except KeyError:
            return None


def records_from_entry(entry: Any) -> dict[str, RendezvousRecord]:
    """Run id -> record, from what `DHT.get(COORDINATORS_KEY, latest=True)` returned (pure)."""
    subkeys = getattr(entry, "value", None)
    if not isinstance(subkeys, dict):
        return {}  # nothing published, or a plain value someone stored without a subkey
    found = {}
    for run_id, item in subkeys.items():
        record = RendezvousRecord.from_value(getattr(item, "value", None))
        if isinstance(run_id, str) and record is not None:
            found[run_id] = record
    return found


def find_coordinators(dht: hivemind.DHT) -> dict[str, RendezvousRecord]:
    """Every coordinator reachable through `dht`, by run id (blocking: one DHT lookup)."""
    return records_from_entry(dht.get(COORDINATORS_KEY, latest=True))
