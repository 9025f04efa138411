"""The one typed run configuration: every knob of a swarmtrain run, validated strictly.

A run is described by a single `RunConfig` with six sections. Unknown keys, wrong types
and impossible values are rejected by pydantic; `configs.loader` turns its errors into
one line per problem that names the key and the rule.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from configs.compression import CompressionPolicy
from configs.errors import ConfigRuleError

__all__ = ["ConfigRuleError", "CoordinatorConfig", "DataConfig", "MetricsConfig", "ModelConfig", "RunConfig",
           "TrainingConfig", "WorkerConfig"]

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Port = Annotated[int, Field(ge=0, le=65535, description="TCP port; 0 picks a free one")]


class _Section(BaseModel):
    # strict: a YAML string is never silently coerced into a number or a bool.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelConfig(_Section):
    """GPT-J architecture, named as in Hugging Face's GPTJConfig where one exists."""

    n_layer: PositiveInt  # transformer blocks
    d_model: PositiveInt  # hidden size (GPTJConfig.n_embd)
    n_head: PositiveInt  # attention heads; d_model must divide evenly
    rotary_dim: PositiveInt  # leading dims of each head that get rotary embedding
    vocab_size: PositiveInt  # rows of wte and lm_head
    n_ctx: PositiveInt  # longest sequence the model accepts (GPTJConfig.n_positions)
    d_ff: PositiveInt | None = None  # MLP inner size (GPTJConfig.n_inner); None = 4 * d_model
    layer_norm_epsilon: PositiveFloat = 1e-5
    init_std: PositiveFloat = 0.02  # std of the normal init (GPTJConfig.initializer_range)
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0  # embd/resid/attn dropout
    # A Hugging Face GPT-J checkpoint directory to start from instead of the seed's random
    # weights (configs/pretrained.py): read on the coordinator's machine, which serves each
    # worker its stage's tensors; the fields above must match its config.json.
    pretrained: str | None = Field(None, min_length=1)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @model_validator(mode="after")
    def _shape_rules(self) -> ModelConfig:
        if self.d_model % self.n_head:
            raise _rule("d_model", f"must be divisible by n_head={self.n_head} (got {self.d_model})")
        if self.rotary_dim > self.head_dim:
            raise _rule(
                "rotary_dim",
                f"must be <= head dim d_model/n_head = {self.head_dim} (got {self.rotary_dim})",
            )
        if self.rotary_dim % 2:
            raise _rule("rotary_dim", f"must be even: rotary rotates pairs (got {self.rotary_dim})")
        return self


class DataConfig(_Section):
    """Where tokens come from. Empty `paths` = the embedded corpus every machine has."""

    # Local .txt / .jsonl files or directories of them; [] uses the Python standard
    # library's own source, present on every machine that runs swarmtrain.
    paths: list[str] = []
    jsonl_field: str = Field("text", min_length=1)  # the text field of each JSONL record
    # "bytes" (256 symbols, nothing to download or train) or a local tokenizer.json path.
    tokenizer: str = Field("bytes", min_length=1)
    validation_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.02
    max_corpus_bytes: PositiveInt | None = None  # read at most this much text (None = all)
    # A directory written by `coordinator data prepare`: workers memory-map its token shards
    # instead of reading and tokenizing `paths` themselves (start-up then no longer grows with
    # the corpus). Its tokenizer must be `tokenizer`'s.
    prepared: str | None = None
    # With `prepared`, the coordinator hands stage 0's replicas the data in ranges of this many
    # optimizer steps (coordinator/swarm/data_ledger.py): once per epoch each, across churn and restarts.
    handout_steps: PositiveInt = 16
    # An HTTP(S) base URL where the operator publishes the prepared directory: volunteers fetch the
    # shards they train from it into their cache (worker --data-cache). Unset: from the coordinator.
    url: str | None = None


class TrainingConfig(_Section):
    seed: NonNegativeInt = 0  # model init, data order, dropout
    seq_len: PositiveInt  # tokens per training sequence; <= model.n_ctx
    micro_batch_size: PositiveInt  # sequences per forward/backward pass
    # micro-batches a first-stage replica keeps in the pipeline at once: each stage holds their
    # activations (configs/memory.py), and a pipeline of S stages needs about S of them to stay
    # busy (coordinator/planning/pipeline_rate.py; `coordinator plan` shows the share it keeps)
    microbatches_in_flight: PositiveInt = 4
    batch_size: PositiveInt  # sequences per optimizer step (a multiple of micro_batch_size)
    learning_rate: PositiveFloat = 3e-4
    min_learning_rate: Annotated[float, Field(ge=0)] = 3e-5  # cosine schedule floor
    warmup_steps: NonNegativeInt = 0
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    adam_beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    adam_beta2: Annotated[float, Field(ge=0, lt=1)] = 0.95
    grad_clip: PositiveFloat | None = 1.0
    # The outer step of a stage's averaging rounds (DiLoCo): Nesterov momentum SGD on the
    # replicas' mean pseudo-gradient. lr 1 and momentum 0 (the default) make a round the mean of
    # the replicas' parameters, which stays stable when rounds come every few steps; DiLoCo's
    # 0.7 and 0.9 suit rounds hundreds of steps apart (with a short period they diverged here).
    outer_learning_rate: Annotated[float, Field(gt=0, le=2)] = 1.0
    outer_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # A replica passes over a round leader that began no round for 4x its usual gap, never
    # sooner than this (worker/replicas/leadership.py): rounds wait on slow links and busy cores.
    leader_takeover_s: PositiveFloat = 30.0
    total_tokens: PositiveInt  # the run's token budget; sets the schedule length
    # Compute precision of training; master weights and Adam state stay fp32 (16 B/param).
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    eval_interval_steps: PositiveInt = 50
    eval_batches: PositiveInt = 8

    @model_validator(mode="after")
    def _batch_rules(self) -> TrainingConfig:
        if self.batch_size % self.micro_batch_size:
            raise _rule(
                "batch_size",
                f"must be a multiple of micro_batch_size={self.micro_batch_size} (got {self.batch_size})",
            )
        if self.min_learning_rate > self.learning_rate:
            raise _rule("min_learning_rate", f"must be <= learning_rate={self.learning_rate}")
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def tokens_per_microbatch(self) -> int:
        return self.micro_batch_size * self.seq_len


class CoordinatorConfig(_Section):
    run_id: str = Field("swarmtrain", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    host: str = Field("0.0.0.0", min_length=1)
    grpc_port: Port = 50500
    dht_port: Port = 50510
    metrics_port: Port = 9500
    state_dir: str = Field("swarmtrain-state", min_length=1)
    join_token: str | None = None  # None = anyone who finds the swarm may join
    heartbeat_interval_s: PositiveFloat = 5.0
    heartbeat_timeout_s: PositiveFloat = 30.0  # silence after which a worker is gone
    lease_s: PositiveFloat = 300.0  # how long workers train on without the coordinator
    replan_min_gain: Annotated[float, Field(ge=0)] = 0.10  # hysteresis: move only for >=10%
    # ...and reshuffle for measured speed alone at most this often, the first time one interval
    # after start: measured rates are noisy, every move costs a state download (a join, a
    # departure or an unserved stage re-plans at once regardless)
    replan_min_interval_s: Annotated[float, Field(ge=0)] = 300.0
    # Joins one address may make: a sustained rate per second and a burst; 0 turns the limit off
    join_rate_per_address: Annotated[float, Field(ge=0)] = 1.0
    join_burst_per_address: Annotated[float, Field(ge=1)] = 20.0
    # Ban a worker once its peers reported its messages as outliers or non-finite in this many
    # heartbeat intervals (rules in coordinator/swarm/trust.py); 0 never bans
    ban_after_reports: NonNegativeInt = 5
    compression: CompressionPolicy = CompressionPolicy()  # which codec each worker gets, and when
    # Checkpoints of the whole model, kept in state_dir/checkpoints: how often (0 = never), how
    # many complete ones to keep, and how long the stages' writers get to upload one. A run's
    # first one comes early, first_checkpoint_s after training starts: until there is one, a lost
    # stage has nothing to come back from but the seed.
    checkpoint_interval_s: Annotated[float, Field(ge=0)] = 1800.0
    first_checkpoint_s: Annotated[float, Field(ge=0)] = 300.0
    checkpoints_kept: PositiveInt = 3
    checkpoint_timeout_s: PositiveFloat = 600.0

    @model_validator(mode="after")
    def _timing_rules(self) -> CoordinatorConfig:
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise _rule(
                "heartbeat_timeout_s",
                f"must exceed heartbeat_interval_s={self.heartbeat_interval_s} (got {self.heartbeat_timeout_s})",
            )
        if self.lease_s < self.heartbeat_timeout_s:
            raise _rule("lease_s", f"must be >= heartbeat_timeout_s={self.heartbeat_timeout_s}")
        return self


class WorkerConfig(_Section):
    host: str = Field("0.0.0.0", min_length=1)  # address the data plane listens on
    metrics_port: Port = 0
    max_memory_bytes: PositiveInt | None = None  # cap on what the planner may use of this GPU
    public_name: str | None = Field(None, max_length=64)
    log_interval_s: PositiveFloat = 2.0  # status line refresh


class MetricsConfig(_Section):
    energy_usd_per_kwh: Annotated[float, Field(ge=0)] = 0.15
    # Catalog GPU used for "what would this cost in a datacenter" comparisons.
    datacenter_reference_gpu: str = Field("A100-80GB", min_length=1)


class RunConfig(_Section):
    """Everything that defines a run. Sections are independent; constructors take their own."""

    model: ModelConfig
    data: DataConfig = DataConfig()
    training: TrainingConfig
    coordinator: CoordinatorConfig = CoordinatorConfig()
    worker: WorkerConfig = WorkerConfig()
    metrics: MetricsConfig = MetricsConfig()

    @model_validator(mode="after")
    def _cross_section_rules(self) -> RunConfig:
        if self.training.seq_len > self.model.n_ctx:
            raise _rule(
                "training.seq_len", f"must be <= model.n_ctx={self.model.n_ctx} (got {self.training.seq_len})"
            )
        if self.data.tokenizer == "bytes" and self.model.vocab_size < 256:
            raise _rule(
                "model.vocab_size",
                f"must be >= 256 for the byte tokenizer (got {self.model.vocab_size})",
            )
        return self

    def fingerprint(self) -> str:
        """Hash of what makes two processes train the same run (model, data, training).

        Deployment knobs (ports, hosts, names) are left out: a volunteer with another
        port still trains the same model. So is the token budget (training.total_tokens): it
        says where the run ends, and raising it on a restart continues the same run.
        """
        payload = {k: getattr(self, k).model_dump(mode="json") for k in ("model", "data", "training")}
        del payload["training"]["total_tokens"]
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def state_path(self) -> Path:
        return Path(self.coordinator.state_dir)


def _rule(key: str, message: str) -> ConfigRuleError:
    return ConfigRuleError(key, message)
