"""The training runtime's decisions, as pure functions: when a replica leads its next averaging round,
which replicas a joiner downloads its state from, and which re-assignments a running role takes in place.

Rounds: every `sync_period_steps` of its local steps (0 counts as 1), the replica that leads the
stage's rounds (worker.replicas.leadership) averages the replicas' parameters. Rounds run beside
the training, but they share the stage's links with the activations: their bulk goes at
BULK_LINK_SHARE of the link (worker.pipeline.pacing), and rounds are spaced to keep the link at
most ROUND_LINK_SHARE busy with their bytes, and a round open at most ROUND_TIME_SHARE of the time
(`round_gap`), even when the period is a single step; a leader's first EARLY_ROUNDS rounds are
spaced by the time share alone, as the anchor lags the training most early in a run.

The period is the most steps between two rounds, not the cadence: the coordinator computes it
from datasheet compute rates, which overstate how fast a small stage steps many times over
(pipeline hops cost more than its compute), and so hands out periods far longer than the link
needs. A leader therefore starts its first round after at most FIRST_ROUND_STEPS steps, measures
what a round costs, and from then on starts one as soon as the rounds' share of the link allows,
or when the period is up, whichever comes first (`round_due`).
"""

from __future__ import annotations

from collections.abc import Collection

from protos import swarmtrain_pb2 as pb
from worker.pipeline.route import Replica

ROUND_LINK_SHARE = 0.1  # at most this share of the link's capacity goes to averaging rounds
ROUND_TIME_SHARE = 1 / 3  # and at most this share of the time has a round open (lock waits, compute)
FIRST_ROUND_STEPS = 8  # a leader's first round comes this early, to measure what a round costs
EARLY_ROUNDS = 6  # the gaps after a leader's first rounds are set by ROUND_TIME_SHARE alone (round_gap)
DOWNLOAD_TRIES = 3  # listed replicas a joiner tries for its state before it falls back

# what a role is built from; a re-assignment that changes none of these nor the stage boundaries
# (only codecs, the averaging period, overlapped steps, stage 0's data shard or the plan version)
# is applied in place (keeps_role)
ROLE_FIELDS = ("stage_index", "num_stages", "layer_start", "layer_end", "averaging_group", "config_hash",
               "generation")


def round_gap(seconds: float, round_bytes: int, link_bytes_per_s: float | None, *, early: bool = False) -> float:
    """Seconds from the end of a round that took `seconds` and moved `round_bytes` (both ways)
    until the next one, so that rounds use at most ROUND_LINK_SHARE of a link of
    `link_bytes_per_s` (unknown: count the whole round as link time) and are open at most
    ROUND_TIME_SHARE of the time (pure).

    `early` (a leader's first EARLY_ROUNDS rounds) drops the link share: early in a run the loss
    falls fastest, so the anchor, which is the swarm's model (what evaluations, checkpoints and
    exports read), lags the replicas' training most, and the replicas drift apart fastest. The
    time share still bounds them: a round is open at most a third of the time, and its bulk goes
    at BULK_LINK_SHARE of the sender's upload (worker.pipeline.pacing)."""
    link_s = round_bytes / link_bytes_per_s if link_bytes_per_s else seconds
    by_time = seconds * (1 / ROUND_TIME_SHARE - 1)
    if early:
        return max(by_time, 0.0)
    return max(link_s / ROUND_LINK_SHARE - seconds, by_time, 0.0)


def round_due(steps_since: int, period: int, rounds_led: int, now: float, next_round_at: float) -> bool:
    """Whether to try a round `steps_since` steps after the last one, with `rounds_led` rounds led
    so far and the next allowed from `next_round_at` on (pure; see the module docstring). Only a
    stage's leader starts one; the others' tries return at once."""
    if steps_since <= 0:
        return False
    if steps_since >= period:
        return True
    if rounds_led:
        return now >= next_round_at
    return steps_since >= FIRST_ROUND_STEPS


def download_order(replicas: list[Replica], trained: Collection[str], serving: Collection[str] = (),
                   limit: int = DOWNLOAD_TRIES) -> list[tuple[Replica, bool]]:
    """Which of our stage's listed replicas a new replica downloads its state from, in order, and
    whether to wait for each while it does not serve yet (pure).

    Where the coordinator says which replicas serve their state (`serving`, from their
    heartbeats), those come first, trained ones before the others; after them only trained ones
    that do not serve yet, to be waited for: one that does not serve then is restarting its role
    (as it does when a re-assignment gives it other work; keeps_role). One that neither serves nor
    has trained has nothing for us. Where no listed replica is said to serve (a coordinator that
    does not tell, or every replica restarting), those that have trained come first and are waited
    for; one that has not trained holds the seed, as we do, or is downloading itself, maybe from
    us: waiting for it could only stall us both."""
    served = [r for r in replicas if r.peer_id.to_base58() in serving]
    if not served:
        first = [r for r in replicas if r.peer_id.to_base58() in trained]
        rest = [r for r in replicas if r.peer_id.to_base58() not in trained]
        return [(r, True) for r in first][:limit] + [(r, False) for r in rest][:max(0, limit - len(first))]
    ready = sorted(served, key=lambda r: r.peer_id.to_base58() not in trained)[:limit]
    later = [r for r in replicas if r.peer_id.to_base58() in trained and r not in served]
    return ([(r, r.peer_id.to_base58() in trained) for r in ready]
            + [(r, True) for r in later][:max(0, limit - len(ready))])


def keeps_role(old: pb.Assignment | None, new: pb.Assignment) -> bool:
    """Whether `new` asks for the same work as `old`, with other settings at most (pure).

    A re-plan re-issues every worker's assignment, and the coordinator re-issues one whose
    measured compute rate changes its codecs or period; restarting the role for those would stop
    a served stage's server (its driver's calls fail over) or a driver mid-step, and make a
    joiner wait for state. Stage 0 moves to a new data shard between two steps (a replica of
    stage 0 joined or left), so that too is a setting."""
    if old is None or any(getattr(old, f) != getattr(new, f) for f in ROLE_FIELDS):
        return False
    return list(old.stage_boundaries) == list(new.stage_boundaries)


def stage_key(run_id: str, index: int, start: int, end: int, generation: int = 0) -> str:
    """The name stage `index` (layers [start, end)) of run `run_id` is served under. After a rollback
    (`generation` > 0) the name changes, so that no stage still on the old parameters talks to one
    rebuilt from the checkpoint."""
    return f"{run_id}.stage{index}.{start}-{end}" + (f".g{generation}" if generation else "")
