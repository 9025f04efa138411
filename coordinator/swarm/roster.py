"""Who is in the swarm: each worker's record as it joins, beats, leaves, goes silent or is expelled,
and which data-plane peer id belongs to whom (pure: records in, records out; no I/O, no clock).

The orchestrator commits what these return to the registry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from coordinator.storage.registry import ACTIVE, BANNED, GONE, LEFT, REVOKED, WorkerRecord


def rejoined(record: WorkerRecord, profile: bytes, now: float, lease_s: float, address: str,
             token_name: str) -> WorkerRecord:
    """A known worker back with its id and token: active again, with a fresh lease."""
    return replace(record, profile=profile, state=ACTIVE, last_heartbeat_unix=now,
                   lease_expires_unix=now + lease_s, address=address, join_token_name=token_name)


def renewed(record: WorkerRecord, now: float, lease_s: float, tokens: int, tokens_per_second: float,
            local_step: int) -> WorkerRecord:
    """A heartbeat: the lease runs from now, the worker's counters move on."""
    return replace(record, last_heartbeat_unix=now, lease_expires_unix=now + lease_s,
                   tokens_total=record.tokens_total + tokens, tokens_per_second=tokens_per_second,
                   local_step=local_step)


def restarted_clock(record: WorkerRecord, now: float) -> WorkerRecord:
    """The coordinator was away, so the worker could not beat: its silence counts from now."""
    return replace(record, last_heartbeat_unix=now)


def expired(active: Iterable[WorkerRecord], now: float, timeout_s: float) -> list[WorkerRecord]:
    return [r for r in active if now - r.last_heartbeat_unix > timeout_s]


def gone(record: WorkerRecord) -> WorkerRecord:
    return replace(record, state=GONE, stage_index=-1)


def left(record: WorkerRecord) -> WorkerRecord:
    return replace(record, state=LEFT, stage_index=-1)


def banned(record: WorkerRecord, verdict: str) -> WorkerRecord:
    return replace(record, state=BANNED, stage_index=-1, expelled_reason=f"banned after {verdict}")


def revoked(record: WorkerRecord) -> WorkerRecord:
    return replace(record, state=REVOKED, stage_index=-1, expelled_reason=f"expelled: join token "
                   f"{record.join_token_name} was revoked; ask the swarm's operator for a new token")


def members_by_stage(active: Iterable[WorkerRecord]) -> dict[int, list[tuple[str, int]]]:
    """Each served stage's replicas as (worker id, local step)."""
    members: dict[int, list[tuple[str, int]]] = {}
    for r in active:
        if r.stage_index >= 0:
            members.setdefault(r.stage_index, []).append((r.worker_id, r.local_step))
    return members


@dataclass
class PeerBook:
    """Data-plane peer ids: which worker registered each, and which belonged to a banned worker
    (those stay out under any worker id). In memory, rebuilt from the registry at start."""

    owner: dict[str, str] = field(default_factory=dict)  # peer id -> the worker that registered it
    banned: dict[str, str] = field(default_factory=dict)  # peer id -> the banned worker that had it

    def claim(self, peer_id: str, record: WorkerRecord) -> None:
        if not peer_id:
            return
        self.owner[peer_id] = record.worker_id
        if record.state == BANNED:
            self.banned[peer_id] = record.worker_id

    def release(self, peer_id: str, worker_id: str) -> None:
        """The worker may come back with another peer id."""
        if self.owner.get(peer_id) == worker_id:
            del self.owner[peer_id]

    def owner_of(self, peer_id: str, workers: Mapping[str, WorkerRecord]) -> WorkerRecord | None:
        worker_id = self.owner.get(peer_id)
        return workers.get(worker_id) if worker_id else None
