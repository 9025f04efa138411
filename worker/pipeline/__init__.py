"""The pipeline data plane: stages served over hivemind P2P and the driver that trains through them.

- wire: tensors and frames on the wire (codecs, chunking, strict decoding)
- executor: one stage's compute (stateless forward/backward, one call at a time)
- checks: a request's tensors checked before any compute
- accumulation: a stage's pending gradient, each microbatch added once, and its optimizer step
- stage_server: a stage's P2P handlers
- stage_client: calling those handlers on other peers
- failover: throughput-weighted replica choice, and moving a call to another replica
- route: where the remote stages live
- driver: the first stage's training loop over the pipeline (`PipelineDriver`; a stage tells
  the drivers that call it apart by their peer ids)
- admission, attempts, pacing, errors: who may call, which attempt a gradient belongs to,
  bulk pacing on thin links, and the errors sorted by what a caller does about them

Keeping a stage's replicas in step (state transfer, averaging rounds) is `worker.replicas`.
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
from worker.pipeline.failover import ReplicaPicker, call_with_failover
from worker.pipeline.route import Replica, Route, StageRoute
from worker.pipeline.stage_client import ClientStats, StageClient
from worker.pipeline.stage_server import StageServer

__all__ = [
    "BadResponse",
    "ClientStats",
    "DriverStats",
    "NoAnswer",
    "NoReplicaAvailable",
    "PipelineDriver",
    "PipelineError",
    "Replica",
    "ReplicaPicker",
    "RequestRejected",
    "RetryableError",
    "Route",
    "StageClient",
    "StageExecutor",
    "StageRoute",
    "StageServer",
    "StageStats",
    "StageUnavailable",
    "StepReport",
    "WireError",
    "call_with_failover",
]
