"""The compression rule as data: which codecs a worker may use, in what order, and when.

`coordinator.planning.compression_policy` applies it per worker from the worker's link and compute.
Operators read and override it under `coordinator.compression` in a run config, e.g.
`--set coordinator.compression.sync_budget=0.2`.

Codec names are those of configs.codecs (the `Codec` values of protos/swarmtrain.proto). A
ladder lists codecs lightest (least compression) first; the policy walks down it only as far
as the link makes it. The activation ladder takes only codecs that can carry activations.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from configs.codecs import (
    ACTIVATION_CODECS,
    CODECS,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_RANK,
    DEFAULT_TOPK_FRACTION,
    SPARSE_CODECS,
    CodecChoice,
    unknown_codec,
)
from configs.errors import ConfigRuleError

__all__ = ["CODECS", "SPARSE_CODECS", "CodecName", "CompressionPolicy", "blockwise_ratio", "derived_ratios",
           "topk_ratio"]

POWERSGD_NOMINAL_RATIO = 0.01  # depends on the tensor shapes and rank; a planning figure only


def _known_codec(name: str) -> str:
    if name not in CODECS:
        raise ValueError(unknown_codec(name))
    return name


CodecName = Annotated[str, AfterValidator(_known_codec)]
Ratio = Annotated[float, Field(gt=0, le=1)]


def _rule(key: str, message: str) -> ConfigRuleError:
    return ConfigRuleError(key, message)


def blockwise_ratio(bits: int, block_size: int) -> float:
    """Bytes of `bits`-bit values plus one fp32 scale per block, over fp32: (bits*B + 32) / (32*B)."""
    return (bits * block_size + 32) / (32 * block_size)


def topk_ratio(keep_fraction: float) -> float:
    """Each kept value costs a 4-bit code and a 32-bit index, against 32 bits for every value."""
    return keep_fraction * (4 + 32) / 32


def derived_ratios(block_size: int, topk_fraction: float) -> dict[str, float]:
    """Expected compressed / raw (fp32) bytes of every codec, from its parameters."""
    return {
        "none": 1.0,
        "float16": 0.5,
        "bfloat16": 0.5,
        "blockwise_8bit": blockwise_ratio(8, block_size),
        "blockwise_4bit": blockwise_ratio(4, block_size),
        "topk_4bit": topk_ratio(topk_fraction),
        "powersgd": POWERSGD_NOMINAL_RATIO,
    }


class CompressionPolicy(BaseModel):
    """Which codec each worker gets for activations and for stage averaging, and how often it averages.

    Activations: the first codec of `activation_ladder` with which the worker's link carries
    `link_headroom` x what its accelerator computes, and moves one micro-batch's activations
    and gradients in `exposed_transfer_budget` of a step. Stage averaging: the shortest period of
    `sync_periods`, and for it the first codec of `sync_ladder`, whose transfer fits in
    `sync_budget` of the time those local steps take.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    activation_ladder: list[CodecName] = Field(
        default_factory=lambda: ["none", "float16", "blockwise_8bit", "blockwise_4bit"], min_length=1
    )
    # 8-bit first, not float16: workers space rounds by the bytes they move (ROUND_LINK_SHARE),
    # so half the bytes is twice the rounds, and error feedback carries what 8-bit rounds off.
    # The small preset's (c) at 20 Mbit/s, 2 runs each: validation at 108,544 tokens 2.663 and
    # 2.680 with 8-bit, 2.906 and 3.119 with float16; 2.21/2.20 against 2.23/2.25 at 300k.
    sync_ladder: list[CodecName] = Field(
        default_factory=lambda: ["blockwise_8bit", "topk_4bit"], min_length=1
    )
    # compressed / raw bytes each codec is expected to reach; entries given here override the
    # ones derived from block_size and topk_fraction (the rest stay derived)
    ratios: dict[CodecName, Ratio] = Field(default_factory=dict)
    # compress no more than the link needs to carry this multiple of the compute rate (> 1:
    # the margin absorbs jitter, and what activations leave of the link carries averaging)
    link_headroom: Annotated[float, Field(gt=1)] = 1.25
    # and no lighter than keeps what a pipeline cannot hide under this share of a step's compute:
    # one micro-batch's activations crossing at each step's start and its gradients at the end.
    # With few micro-batches per step that transfer, not the bandwidth, is what a thin link costs
    # (a 30-s slow-links run at 3.3M parameters: 8-bit activations took about a fifth of each
    # 20 Mbit/s link, and the pipeline ran at 0.66 of its unshaped speed)
    exposed_transfer_budget: Annotated[float, Field(gt=0, le=1)] = 0.1
    sync_periods: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=lambda: [1, 4, 16, 64, 256], min_length=1
    )  # local steps between averaging rounds of a stage's replicas, shortest first
    sync_budget: Annotated[float, Field(gt=0, le=1)] = 0.1  # share of those steps' time a round may take
    block_size: Annotated[int, Field(gt=0)] = DEFAULT_BLOCK_SIZE  # values per scale in blockwise codecs
    topk_fraction: Annotated[float, Field(gt=0, le=1)] = DEFAULT_TOPK_FRACTION  # share of values top-k keeps
    powersgd_rank: Annotated[int, Field(gt=0)] = DEFAULT_RANK
    # where a worker's link needs activation compression, its pipeline overlaps consecutive
    # steps: faster on a thin link, but the first stage's gradients become one step stale,
    # which on the slow-links benchmark cost more loss per token than the speed bought back
    # (docs/design.md, "Overlapped steps"); off by default
    overlap_steps: bool = False

    @model_validator(mode="before")
    @classmethod
    def _fill_ratios(cls, data: Any) -> Any:
        # derived ratios first, the operator's overrides on top; a bad block_size or fraction
        # is left for the field validators to report
        if not isinstance(data, dict):
            return data
        block = data.get("block_size", DEFAULT_BLOCK_SIZE)
        keep = data.get("topk_fraction", DEFAULT_TOPK_FRACTION)
        if not (isinstance(block, int) and block > 0 and isinstance(keep, int | float) and 0 < keep <= 1):
            return data
        given = data.get("ratios") or {}
        if not isinstance(given, dict):
            return data
        return {**data, "ratios": {**derived_ratios(block, float(keep)), **given}}

    @model_validator(mode="after")
    def _ladder_rules(self) -> CompressionPolicy:
        sparse = [c for c in self.activation_ladder if c not in ACTIVATION_CODECS]
        if sparse:
            raise _rule("activation_ladder", f"{', '.join(sparse)} cannot carry activations (they drop most "
                                             f"of each tensor); valid: {', '.join(ACTIVATION_CODECS)}")
        for name in ("activation_ladder", "sync_ladder"):
            ladder = getattr(self, name)
            missing = [c for c in ladder if c not in self.ratios]
            if missing:
                raise _rule("ratios", f"no ratio for {', '.join(missing)} (used in {name})")
            if len(set(ladder)) != len(ladder):
                raise _rule(name, f"lists a codec twice (got {ladder})")
            shown = [self.ratios[c] for c in ladder]
            if any(b > a for a, b in zip(shown, shown[1:])):
                raise _rule(
                    name,
                    "must go from the lightest compression to the heaviest (ratios may not rise): "
                    + ", ".join(f"{c} {r:.3g}" for c, r in zip(ladder, shown)),
                )
        periods = self.sync_periods
        if any(b <= a for a, b in zip(periods, periods[1:])):
            raise _rule("sync_periods", f"must increase strictly (got {periods})")
        return self

    def ratio(self, codec: str) -> float:
        return self.ratios[codec]

    def choice(self, codec: str) -> CodecChoice:
        """`codec` with this policy's parameters."""
        return CodecChoice(codec, self.block_size, self.topk_fraction, self.powersgd_rank)
