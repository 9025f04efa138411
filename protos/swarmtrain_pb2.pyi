from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_UNSPECIFIED: _ClassVar[Codec]
    CODEC_NONE: _ClassVar[Codec]
    CODEC_FLOAT16: _ClassVar[Codec]
    CODEC_BFLOAT16: _ClassVar[Codec]
    CODEC_BLOCKWISE_8BIT: _ClassVar[Codec]
    CODEC_BLOCKWISE_4BIT: _ClassVar[Codec]
    CODEC_TOPK_4BIT: _ClassVar[Codec]
    CODEC_POWERSGD: _ClassVar[Codec]

class TrafficKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAFFIC_KIND_UNSPECIFIED: _ClassVar[TrafficKind]
    TRAFFIC_KIND_ACTIVATIONS: _ClassVar[TrafficKind]
    TRAFFIC_KIND_GRADIENTS: _ClassVar[TrafficKind]
    TRAFFIC_KIND_STATE: _ClassVar[TrafficKind]

class Instruction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INSTRUCTION_UNSPECIFIED: _ClassVar[Instruction]
    INSTRUCTION_CONTINUE: _ClassVar[Instruction]
    INSTRUCTION_REASSIGN: _ClassVar[Instruction]
    INSTRUCTION_DRAIN: _ClassVar[Instruction]
    INSTRUCTION_COMPLETE: _ClassVar[Instruction]

class WorkerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_STATE_UNSPECIFIED: _ClassVar[WorkerState]
    WORKER_STATE_ACTIVE: _ClassVar[WorkerState]
    WORKER_STATE_GONE: _ClassVar[WorkerState]
    WORKER_STATE_LEFT: _ClassVar[WorkerState]
    WORKER_STATE_BANNED: _ClassVar[WorkerState]
    WORKER_STATE_REVOKED: _ClassVar[WorkerState]

class Reachability(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REACHABILITY_UNSPECIFIED: _ClassVar[Reachability]
    REACHABILITY_DIRECT: _ClassVar[Reachability]
    REACHABILITY_UNREACHABLE: _ClassVar[Reachability]
CODEC_UNSPECIFIED: Codec
CODEC_NONE: Codec
CODEC_FLOAT16: Codec
CODEC_BFLOAT16: Codec
CODEC_BLOCKWISE_8BIT: Codec
CODEC_BLOCKWISE_4BIT: Codec
CODEC_TOPK_4BIT: Codec
CODEC_POWERSGD: Codec
TRAFFIC_KIND_UNSPECIFIED: TrafficKind
TRAFFIC_KIND_ACTIVATIONS: TrafficKind
TRAFFIC_KIND_GRADIENTS: TrafficKind
TRAFFIC_KIND_STATE: TrafficKind
INSTRUCTION_UNSPECIFIED: Instruction
INSTRUCTION_CONTINUE: Instruction
INSTRUCTION_REASSIGN: Instruction
INSTRUCTION_DRAIN: Instruction
INSTRUCTION_COMPLETE: Instruction
WORKER_STATE_UNSPECIFIED: WorkerState
WORKER_STATE_ACTIVE: WorkerState
WORKER_STATE_GONE: WorkerState
WORKER_STATE_LEFT: WorkerState
WORKER_STATE_BANNED: WorkerState
WORKER_STATE_REVOKED: WorkerState
REACHABILITY_UNSPECIFIED: Reachability
REACHABILITY_DIRECT: Reachability
REACHABILITY_UNREACHABLE: Reachability

class WorkerProfile(_message.Message):
    __slots__ = ("software_version", "gpu_name", "gpu_count", "memory_bytes", "achieved_flops", "peak_flops", "upload_bps", "download_bps", "usd_per_hour", "public_name", "peer_id", "multiaddrs", "metrics_endpoint")
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    GPU_NAME_FIELD_NUMBER: _ClassVar[int]
    GPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACHIEVED_FLOPS_FIELD_NUMBER: _ClassVar[int]
    PEAK_FLOPS_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_BPS_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_BPS_FIELD_NUMBER: _ClassVar[int]
    USD_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_NAME_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    MULTIADDRS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    software_version: str
    gpu_name: str
    gpu_count: int
    memory_bytes: int
    achieved_flops: float
    peak_flops: float
    upload_bps: float
    download_bps: float
    usd_per_hour: float
    public_name: str
    peer_id: str
    multiaddrs: _containers.RepeatedScalarFieldContainer[str]
    metrics_endpoint: str
    def __init__(self, software_version: _Optional[str] = ..., gpu_name: _Optional[str] = ..., gpu_count: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., achieved_flops: _Optional[float] = ..., peak_flops: _Optional[float] = ..., upload_bps: _Optional[float] = ..., download_bps: _Optional[float] = ..., usd_per_hour: _Optional[float] = ..., public_name: _Optional[str] = ..., peer_id: _Optional[str] = ..., multiaddrs: _Optional[_Iterable[str]] = ..., metrics_endpoint: _Optional[str] = ...) -> None: ...

class CompressionSpec(_message.Message):
    __slots__ = ("codec", "block_size", "topk_fraction", "rank")
    CODEC_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOPK_FRACTION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    codec: Codec
    block_size: int
    topk_fraction: float
    rank: int
    def __init__(self, codec: _Optional[_Union[Codec, str]] = ..., block_size: _Optional[int] = ..., topk_fraction: _Optional[float] = ..., rank: _Optional[int] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("plan_version", "stage_index", "num_stages", "layer_start", "layer_end", "activation_compression", "sync_compression", "sync_period_steps", "averaging_group", "config_hash", "lease_expires_unix", "stage_boundaries", "data_shard_index", "data_shard_count", "overlap_steps", "generation")
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    SYNC_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    SYNC_PERIOD_STEPS_FIELD_NUMBER: _ClassVar[int]
    AVERAGING_GROUP_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    STAGE_BOUNDARIES_FIELD_NUMBER: _ClassVar[int]
    DATA_SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_STEPS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    plan_version: int
    stage_index: int
    num_stages: int
    layer_start: int
    layer_end: int
    activation_compression: CompressionSpec
    sync_compression: CompressionSpec
    sync_period_steps: int
    averaging_group: str
    config_hash: str
    lease_expires_unix: float
    stage_boundaries: _containers.RepeatedScalarFieldContainer[int]
    data_shard_index: int
    data_shard_count: int
    overlap_steps: bool
    generation: int
    def __init__(self, plan_version: _Optional[int] = ..., stage_index: _Optional[int] = ..., num_stages: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., activation_compression: _Optional[_Union[CompressionSpec, _Mapping]] = ..., sync_compression: _Optional[_Union[CompressionSpec, _Mapping]] = ..., sync_period_steps: _Optional[int] = ..., averaging_group: _Optional[str] = ..., config_hash: _Optional[str] = ..., lease_expires_unix: _Optional[float] = ..., stage_boundaries: _Optional[_Iterable[int]] = ..., data_shard_index: _Optional[int] = ..., data_shard_count: _Optional[int] = ..., overlap_steps: _Optional[bool] = ..., generation: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("profile", "join_token", "worker_id", "session_token")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    profile: WorkerProfile
    join_token: str
    worker_id: str
    session_token: str
    def __init__(self, profile: _Optional[_Union[WorkerProfile, _Mapping]] = ..., join_token: _Optional[str] = ..., worker_id: _Optional[str] = ..., session_token: _Optional[str] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("worker_id", "session_token", "assignment", "run_config_json", "heartbeat_interval_s", "run_id", "status", "pretrained_fingerprint", "data_url")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    RUN_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PRETRAINED_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DATA_URL_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session_token: str
    assignment: Assignment
    run_config_json: str
    heartbeat_interval_s: float
    run_id: str
    status: str
    pretrained_fingerprint: str
    data_url: str
    def __init__(self, worker_id: _Optional[str] = ..., session_token: _Optional[str] = ..., assignment: _Optional[_Union[Assignment, _Mapping]] = ..., run_config_json: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., run_id: _Optional[str] = ..., status: _Optional[str] = ..., pretrained_fingerprint: _Optional[str] = ..., data_url: _Optional[str] = ...) -> None: ...

class TrafficCounter(_message.Message):
    __slots__ = ("kind", "sent_bytes", "received_bytes", "uncompressed_bytes")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    UNCOMPRESSED_BYTES_FIELD_NUMBER: _ClassVar[int]
    kind: TrafficKind
    sent_bytes: int
    received_bytes: int
    uncompressed_bytes: int
    def __init__(self, kind: _Optional[_Union[TrafficKind, str]] = ..., sent_bytes: _Optional[int] = ..., received_bytes: _Optional[int] = ..., uncompressed_bytes: _Optional[int] = ...) -> None: ...

class PeerReport(_message.Message):
    __slots__ = ("peer_id", "reason", "count")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    reason: str
    count: int
    def __init__(self, peer_id: _Optional[str] = ..., reason: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class Counters(_message.Message):
    __slots__ = ("tokens", "samples", "loss_sum", "loss_count", "traffic", "compute_seconds", "wait_seconds", "local_step", "reports", "serves_state")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_SUM_FIELD_NUMBER: _ClassVar[int]
    LOSS_COUNT_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEP_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    SERVES_STATE_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    samples: int
    loss_sum: float
    loss_count: int
    traffic: _containers.RepeatedCompositeFieldContainer[TrafficCounter]
    compute_seconds: float
    wait_seconds: float
    local_step: int
    reports: _containers.RepeatedCompositeFieldContainer[PeerReport]
    serves_state: bool
    def __init__(self, tokens: _Optional[int] = ..., samples: _Optional[int] = ..., loss_sum: _Optional[float] = ..., loss_count: _Optional[int] = ..., traffic: _Optional[_Iterable[_Union[TrafficCounter, _Mapping]]] = ..., compute_seconds: _Optional[float] = ..., wait_seconds: _Optional[float] = ..., local_step: _Optional[int] = ..., reports: _Optional[_Iterable[_Union[PeerReport, _Mapping]]] = ..., serves_state: _Optional[bool] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "session_token", "plan_version", "counters", "data_progress")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    DATA_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session_token: str
    plan_version: int
    counters: Counters
    data_progress: _containers.RepeatedCompositeFieldContainer[DataProgress]
    def __init__(self, worker_id: _Optional[str] = ..., session_token: _Optional[str] = ..., plan_version: _Optional[int] = ..., counters: _Optional[_Union[Counters, _Mapping]] = ..., data_progress: _Optional[_Iterable[_Union[DataProgress, _Mapping]]] = ...) -> None: ...

class DataProgress(_message.Message):
    __slots__ = ("range_id", "trained")
    RANGE_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FIELD_NUMBER: _ClassVar[int]
    range_id: int
    trained: int
    def __init__(self, range_id: _Optional[int] = ..., trained: _Optional[int] = ...) -> None: ...

class DataRange(_message.Message):
    __slots__ = ("range_id", "epoch", "start", "end", "trained")
    RANGE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FIELD_NUMBER: _ClassVar[int]
    range_id: int
    epoch: int
    start: int
    end: int
    trained: int
    def __init__(self, range_id: _Optional[int] = ..., epoch: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., trained: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("instruction", "assignment", "lease_expires_unix", "status", "checkpoint", "grant", "data_ranges", "data_fingerprint", "data_acknowledged", "reachability")
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    DATA_RANGES_FIELD_NUMBER: _ClassVar[int]
    DATA_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DATA_ACKNOWLEDGED_FIELD_NUMBER: _ClassVar[int]
    REACHABILITY_FIELD_NUMBER: _ClassVar[int]
    instruction: Instruction
    assignment: Assignment
    lease_expires_unix: float
    status: str
    checkpoint: CheckpointRequest
    grant: TokenGrant
    data_ranges: _containers.RepeatedCompositeFieldContainer[DataRange]
    data_fingerprint: str
    data_acknowledged: _containers.RepeatedCompositeFieldContainer[DataProgress]
    reachability: Reachability
    def __init__(self, instruction: _Optional[_Union[Instruction, str]] = ..., assignment: _Optional[_Union[Assignment, _Mapping]] = ..., lease_expires_unix: _Optional[float] = ..., status: _Optional[str] = ..., checkpoint: _Optional[_Union[CheckpointRequest, _Mapping]] = ..., grant: _Optional[_Union[TokenGrant, _Mapping]] = ..., data_ranges: _Optional[_Iterable[_Union[DataRange, _Mapping]]] = ..., data_fingerprint: _Optional[str] = ..., data_acknowledged: _Optional[_Iterable[_Union[DataProgress, _Mapping]]] = ..., reachability: _Optional[_Union[Reachability, str]] = ...) -> None: ...

class TokenGrant(_message.Message):
    __slots__ = ("tokens_left",)
    TOKENS_LEFT_FIELD_NUMBER: _ClassVar[int]
    tokens_left: int
    def __init__(self, tokens_left: _Optional[int] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("checkpoint_id", "stage_index", "layer_start", "layer_end")
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: int
    stage_index: int
    layer_start: int
    layer_end: int
    def __init__(self, checkpoint_id: _Optional[int] = ..., stage_index: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ...) -> None: ...

class CheckpointFile(_message.Message):
    __slots__ = ("worker_id", "session_token", "checkpoint_id", "stage_index", "layer_start", "layer_end", "size_bytes", "sha256")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session_token: str
    checkpoint_id: int
    stage_index: int
    layer_start: int
    layer_end: int
    size_bytes: int
    sha256: str
    def __init__(self, worker_id: _Optional[str] = ..., session_token: _Optional[str] = ..., checkpoint_id: _Optional[int] = ..., stage_index: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class CheckpointChunk(_message.Message):
    __slots__ = ("file", "data")
    FILE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    file: CheckpointFile
    data: bytes
    def __init__(self, file: _Optional[_Union[CheckpointFile, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SaveCheckpointResponse(_message.Message):
    __slots__ = ("complete",)
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    complete: bool
    def __init__(self, complete: _Optional[bool] = ...) -> None: ...

class LoadCheckpointRequest(_message.Message):
    __slots__ = ("worker_id", "session_token", "layer_start", "layer_end", "has_pretrained")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    HAS_PRETRAINED_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session_token: str
    layer_start: int
    layer_end: int
    has_pretrained: bool
    def __init__(self, worker_id: _Optional[str] = ..., session_token: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., has_pretrained: _Optional[bool] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("worker_id", "session_token", "reason")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session_token: str
    reason: str
    def __init__(self, worker_id: _Optional[str] = ..., session_token: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetSwarmRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "public_name", "state", "stage_index", "gpu_name", "achieved_flops", "tokens_per_second", "last_heartbeat_unix", "peer_id", "multiaddrs", "serves_state", "tokens_total", "joined_unix", "reachability")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    GPU_NAME_FIELD_NUMBER: _ClassVar[int]
    ACHIEVED_FLOPS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_UNIX_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    MULTIADDRS_FIELD_NUMBER: _ClassVar[int]
    SERVES_STATE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    JOINED_UNIX_FIELD_NUMBER: _ClassVar[int]
    REACHABILITY_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    public_name: str
    state: WorkerState
    stage_index: int
    gpu_name: str
    achieved_flops: float
    tokens_per_second: float
    last_heartbeat_unix: float
    peer_id: str
    multiaddrs: _containers.RepeatedScalarFieldContainer[str]
    serves_state: bool
    tokens_total: int
    joined_unix: float
    reachability: Reachability
    def __init__(self, worker_id: _Optional[str] = ..., public_name: _Optional[str] = ..., state: _Optional[_Union[WorkerState, str]] = ..., stage_index: _Optional[int] = ..., gpu_name: _Optional[str] = ..., achieved_flops: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., last_heartbeat_unix: _Optional[float] = ..., peer_id: _Optional[str] = ..., multiaddrs: _Optional[_Iterable[str]] = ..., serves_state: _Optional[bool] = ..., tokens_total: _Optional[int] = ..., joined_unix: _Optional[float] = ..., reachability: _Optional[_Union[Reachability, str]] = ...) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("stage_index", "layer_start", "layer_end", "active_workers", "planned_tokens_per_second")
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    PLANNED_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    stage_index: int
    layer_start: int
    layer_end: int
    active_workers: int
    planned_tokens_per_second: float
    def __init__(self, stage_index: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., active_workers: _Optional[int] = ..., planned_tokens_per_second: _Optional[float] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("trained_tokens", "total_tokens", "last_loss", "tokens_per_second", "traffic", "rollbacks", "rolled_back_tokens", "expected_tokens_per_second", "measured_tokens_per_second", "usd_per_hour", "usd_spent", "kwh_used")
    TRAINED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    ROLLBACKS_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    MEASURED_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    USD_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    USD_SPENT_FIELD_NUMBER: _ClassVar[int]
    KWH_USED_FIELD_NUMBER: _ClassVar[int]
    trained_tokens: int
    total_tokens: int
    last_loss: float
    tokens_per_second: float
    traffic: _containers.RepeatedCompositeFieldContainer[TrafficCounter]
    rollbacks: int
    rolled_back_tokens: int
    expected_tokens_per_second: float
    measured_tokens_per_second: float
    usd_per_hour: float
    usd_spent: float
    kwh_used: float
    def __init__(self, trained_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ..., last_loss: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., traffic: _Optional[_Iterable[_Union[TrafficCounter, _Mapping]]] = ..., rollbacks: _Optional[int] = ..., rolled_back_tokens: _Optional[int] = ..., expected_tokens_per_second: _Optional[float] = ..., measured_tokens_per_second: _Optional[float] = ..., usd_per_hour: _Optional[float] = ..., usd_spent: _Optional[float] = ..., kwh_used: _Optional[float] = ...) -> None: ...

class GetSwarmResponse(_message.Message):
    __slots__ = ("run_id", "config_hash", "plan_version", "stages", "workers", "progress", "planner_note", "last_checkpoint", "generation")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PLANNER_NOTE_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    config_hash: str
    plan_version: int
    stages: _containers.RepeatedCompositeFieldContainer[StageInfo]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    progress: Progress
    planner_note: str
    last_checkpoint: CheckpointInfo
    generation: int
    def __init__(self, run_id: _Optional[str] = ..., config_hash: _Optional[str] = ..., plan_version: _Optional[int] = ..., stages: _Optional[_Iterable[_Union[StageInfo, _Mapping]]] = ..., workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., planner_note: _Optional[str] = ..., last_checkpoint: _Optional[_Union[CheckpointInfo, _Mapping]] = ..., generation: _Optional[int] = ...) -> None: ...

class CheckpointInfo(_message.Message):
    __slots__ = ("checkpoint_id", "completed_unix", "trained_tokens", "size_bytes", "stage_steps")
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_UNIX_FIELD_NUMBER: _ClassVar[int]
    TRAINED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STAGE_STEPS_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: int
    completed_unix: float
    trained_tokens: int
    size_bytes: int
    stage_steps: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, checkpoint_id: _Optional[int] = ..., completed_unix: _Optional[float] = ..., trained_tokens: _Optional[int] = ..., size_bytes: _Optional[int] = ..., stage_steps: _Optional[_Iterable[int]] = ...) -> None: ...
