"""Keeping a stage's replicas in step: state transfer, averaging rounds and who leads them.

- diloco: a replica's anchor, its pseudo-gradient and the outer step
- state_transfer: a stage's state served for download, and fetched by a joining replica
- sync_round: averaging a stage's replicas, led by one of them: the protocol and a round's outcome
- sync_leader, sync_follower: the leader's side of a round, and the followers'
- leadership: which replica leads the rounds, and standing in for a silent leader
"""

from worker.replicas.leadership import LeaderWatch
from worker.replicas.state_transfer import StageState, StateServer, fetch_state
from worker.replicas.sync_follower import SyncFollower
from worker.replicas.sync_leader import lead_round
from worker.replicas.sync_round import RoundResult, leads, params_digest

__all__ = [
    "LeaderWatch",
    "RoundResult",
    "StageState",
    "StateServer",
    "SyncFollower",
    "fetch_state",
    "lead_round",
    "leads",
    "params_digest",
]
