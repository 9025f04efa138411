"""Who may join and who may call (pure: no I/O, no clock of its own).

Each check takes what the coordinator knows (the request's fields, the registry's records, the
managed join tokens by hash, which peer ids are taken or banned) and returns a verdict: a
`Refusal`, or what admits the caller. The orchestrator raises refusals and records admissions.
There is no capacity limit: every admitted worker joins, and the planner leaves idle those it
cannot use.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping

from coordinator.storage.join_tokens import JoinToken, hash_join_token
from coordinator.storage.registry import ACTIVE, EXPELLED, GONE, WorkerRecord, hash_token
from coordinator.swarm.refusal import Refusal

TOKEN_REREAD_S = 1.0  # an unknown join token re-reads the tokens table at most this often


def same_release_line(ours: str, theirs: str) -> bool:
    """Workers must run the coordinator's major.minor: the wire and the model code match there."""
    return ours.split(".")[:2] == theirs.split(".")[:2]


def release_refusal(ours: str, theirs: str) -> Refusal | None:
    if same_release_line(ours, theirs):
        return None
    return Refusal("FAILED_PRECONDITION", f"worker runs swarmtrain {theirs}, this swarm runs {ours}: "
                   f"install swarmtrain {'.'.join(ours.split('.')[:2])}.x and rejoin")


def static_token_matches(presented: str, static: str) -> bool:
    return bool(static) and hmac.compare_digest(presented.encode(), static.encode())


def token_reread_due(presented: str, static: str, tokens: Mapping[str, JoinToken], now: float,
                     read_at: float) -> bool:
    """Whether to re-read the tokens table before judging `presented`: it may be a token the CLI
    added since the last read. At most every TOKEN_REREAD_S, so guesses cannot load the database."""
    if not presented or static_token_matches(presented, static):
        return False
    return hash_join_token(presented) not in tokens and now - read_at >= TOKEN_REREAD_S


def token_verdict(presented: str, static: str, tokens: Mapping[str, JoinToken]) -> str | Refusal:
    """The name of the managed token that admits `presented` ('' for the config's token, or for a
    swarm open to all), or why it is refused. `tokens`: the managed tokens by hash."""
    if static_token_matches(presented, static):
        return ""
    token = tokens.get(hash_join_token(presented)) if presented else None
    if token is not None and token.revoked:
        return Refusal("UNAUTHENTICATED", f"join token {token.name} was revoked: ask the swarm's operator "
                       "for a new one")
    if token is not None:
        return token.name
    # Once the operator has issued a token the swarm stays closed, even when all are revoked.
    if static or tokens:
        what = "no join token" if not presented else "a wrong join token"
        return Refusal("UNAUTHENTICATED",
                       f"{what}: this swarm admits workers started with --join-token <token>")
    return ""


def authenticate(workers: Mapping[str, WorkerRecord], worker_id: str,
                 session_token: str) -> WorkerRecord | Refusal:
    record = workers.get(worker_id)
    if record is None:
        return Refusal("NOT_FOUND", f"unknown worker {worker_id}: call Join without an id to register")
    if not hmac.compare_digest(record.token_hash, hash_token(session_token)):
        return Refusal("UNAUTHENTICATED", f"wrong session token for worker {worker_id}")
    return record


def expelled_message(record: WorkerRecord) -> str:
    """The one line a banned or revoked worker is answered with."""
    return f"worker {record.worker_id} was {record.expelled_reason}"


def expelled_refusal(record: WorkerRecord) -> Refusal | None:
    """A banned or revoked worker never returns, whatever it calls."""
    return Refusal("PERMISSION_DENIED", expelled_message(record)) if record.state in EXPELLED else None


def heartbeat_refusal(record: WorkerRecord) -> Refusal | None:
    """Only an active worker beats; one marked gone or left must join again first."""
    if record.state in EXPELLED:
        return expelled_refusal(record)
    if record.state != ACTIVE:
        why = "missed heartbeats" if record.state == GONE else "left"
        return Refusal("FAILED_PRECONDITION",
                       f"worker {record.worker_id} {why}: call Join with its id and token to return")
    return None


def transfer_refusal(record: WorkerRecord, start: int, end: int, n_layer: int) -> Refusal | None:
    """Checkpoint files move only to and from active workers, and only for layers the model has."""
    if record.state != ACTIVE:
        return Refusal("FAILED_PRECONDITION", f"worker {record.worker_id} is not active: join again first")
    if not 0 <= start < end <= n_layer:
        return Refusal("INVALID_ARGUMENT", f"layers [{start}, {end}) are not a part of [0, {n_layer})")
    return None


def peer_refusal(peer_id: str, worker_id: str, peer_owner: Mapping[str, str], banned_peers: Mapping[str, str],
                 workers: Mapping[str, WorkerRecord]) -> Refusal | None:
    """A banned peer id stays out under any worker id; a live one belongs to one worker."""
    if not peer_id:
        return None
    banned = banned_peers.get(peer_id)
    if banned is not None:
        reason = workers[banned].expelled_reason
        return Refusal("PERMISSION_DENIED", f"peer {peer_id} belongs to worker {banned}, which was {reason}")
    owner = peer_owner.get(peer_id)
    if owner is not None and owner != worker_id and workers[owner].state == ACTIVE:
        return Refusal("ALREADY_EXISTS", f"peer {peer_id} is already registered by worker {owner}")
    return None


def revoked_victims(workers: Iterable[WorkerRecord], revoked_names: set[str]) -> list[WorkerRecord]:
    """The workers admitted with a token among `revoked_names` that are not expelled yet."""
    return [r for r in workers if r.join_token_name in revoked_names and r.state not in EXPELLED]
