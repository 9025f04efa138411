"""The pipeline data plane: stages served over hivemind P2P and the driver that trains through them.

- wire: tensors and frames on the wire (codecs, chunking, strict decoding)
- executor: one stage's compute (stateless forward/backward, accumulation, optimizer steps)
- stage_server: a stage's P2P handlers
- stage_client: calling those handlers on other peers
- replicas: throughput-weighted replica choice and failover
- route: where the remote stages live
- driver: the first stage's training loop over the pipeline
- stage_sync: a stage's state served for download by replicas that join
- sync_round: averaging a stage's replicas, led by one of them
- leadership: which replica leads the rounds, and standing in for a silent leader
"""

from worker.pipeline.driver import DriverStats, PipelineDriver, StepReport
from worker.pipeline.errors import (
    BadResponse,
    NoAnswer,
    NoReplicaAvailable,
    PipelineError,
    RequestRejected,
    RetryableError,
    StageUnavailable,
    WireError,
)
from worker.pipeline.executor import StageExecutor, StageStats
from worker.pipeline.leadership import LeaderWatch
from worker.pipeline.replicas import ReplicaPicker, call_with_failover
from worker.pipeline.route import Replica, Route, StageRoute
from worker.pipeline.stage_client import ClientStats, StageClient
from worker.pipeline.stage_server import StageServer
from worker.pipeline.stage_sync import StageState, StateServer, fetch_state
from worker.pipeline.sync_round import RoundResult, SyncFollower, lead_round, leads, params_digest

__all__ = [
    "BadResponse",
    "ClientStats",
    "DriverStats",
    "LeaderWatch",
    "NoAnswer",
    "NoReplicaAvailable",
    "PipelineDriver",
    "PipelineError",
    "Replica",
    "ReplicaPicker",
    "RequestRejected",
    "RetryableError",
    "RoundResult",
    "Route",
    "StageClient",
    "StageExecutor",
    "StageRoute",
    "StageServer",
    "StageState",
    "StageStats",
    "StageUnavailable",
    "StateServer",
    "StepReport",
    "SyncFollower",
    "WireError",
    "call_with_failover",
    "fetch_state",
    "lead_round",
    "leads",
    "params_digest",
]
