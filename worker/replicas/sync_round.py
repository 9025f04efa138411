"""Rounds among a stage's replicas that leave every participant on the same anchor: the protocol,
its timing, and a round's outcome (the leader's side is worker.replicas.sync_leader, the
followers' worker.replicas.sync_follower).

One replica leads each round: the one whose peer id (base58) sorts first among the live
replicas of the stage, so every replica can tell without talking to the others (unless it
starts no rounds: then the next one stands in, worker.replicas.leadership). The leader

1. calls `sync_begin` on every other replica at once. Each follower takes its executor's lock
   between two optimizer steps (a driving replica finishes the step it is in first), takes its
   compressed pseudo-gradient and a copy of the parameters it came from, releases the lock and
   answers with the pseudo-gradient and its anchor's round (worker.replicas.diloco);
2. under its own lock, averages its own pseudo-gradient with those on its anchor, takes the
   outer step, and moves to the new anchor;
3. sends the compressed outer update in `sync_commit` to the followers on its anchor, and the
   new anchor whole to those on an older one. Each loads it under its lock, keeping what it
   trained since its pseudo-gradient: parameters = new anchor + (parameters now - the copy);
   unless the outcome moves the stage further than an honest round can
   (`diloco.implausible_outcome`): then it keeps its anchor and parameters, refuses the
   commit as `outlier`, and reports the leader.

No replica pauses for the network: a round costs the stage two short holds of the lock (a
DiLoCo round overlapped with the next inner steps, whose progress lands on the new anchor
and goes into the next round's pseudo-gradient). Everyone who took part ends the round on
the same anchor, which `params_digest` of the anchor shows; a replica that did not train
meanwhile ends it with exactly the anchor's parameters. A follower that did not answer in
time keeps training and catches up at the next round; one whose leader vanished drops the
round after `HOLD_S`. Requests only ever go from a lower peer id to a higher one, so two
replicas that briefly disagree about who leads cannot wait on each other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from worker.pipeline.pacing import Pacer

BEGIN, COMMIT = "sync_begin", "sync_commit"
CALL_TIMEOUT_S = 5.0  # per follower and phase: a slow follower is left out, never waited for
BEGIN_RETRIES = 1  # a follower's answer that arrived malformed, or not at all, is asked for once more
HOLD_S = 10.0  # a follower keeps an open round this long for the leader's mean, then drops it
# A follower that could only take its pseudo-gradient after this long (its step was still
# running) lets the round go: the leader, waiting CALL_TIMEOUT_S for its answer, has left it out.
LATE_S = 0.8 * CALL_TIMEOUT_S


def leads(me: str, others: Sequence[str]) -> bool:
    """Whether the replica with base58 peer id `me` leads rounds among `others` (pure)."""
    return all(me < other for other in others)


def params_digest(tensors: Sequence[torch.Tensor]) -> str:
    """A short fingerprint of parameters' exact fp32 values: equal digests, equal parameters."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def bulk_seconds(stage: torch.nn.Module, pacer: Pacer | None) -> float:
    """How long the stage's parameters in fp32 (the most a round sends one way) take at `pacer`'s rate."""
    if pacer is None:
        return 0.0
    return 4 * sum(p.numel() for p in stage.parameters()) / pacer.bytes_per_s


@dataclass
class RoundResult:
    """One round as a replica saw it; `digest` is of the anchor it ended with."""

    round_id: str
    leader: bool
    participants: int  # replicas whose parameters went into the mean, this one included
    agreed: int  # replicas that ended the round with the mean, this one included
    left_out: int  # other replicas asked that did not answer in time
    digest: str
    bytes_in: int  # bytes received in this round (the state kind)
    seconds: float
    problems: list[str] = field(default_factory=list)  # why followers were left out, one line each
    outliers: list[str] = field(default_factory=list)  # peers whose pseudo-gradient the robust aggregate clipped hard
    refused: int = 0  # replicas that refused the outcome: this follower (1), or the leader's followers
    newer: str = ""  # a leader's: the peer id of a follower on a newer anchor than ours (we are behind)


__all__ = ["BEGIN", "BEGIN_RETRIES", "CALL_TIMEOUT_S", "COMMIT", "HOLD_S", "LATE_S", "RoundResult",
           "bulk_seconds", "leads", "params_digest"]
