"""Which tensor codecs exist, and one typed choice of a codec with its parameters.

Codec names are the `Codec` values of protos/swarmtrain.proto, lowercased and without the
`CODEC_` prefix; protos/codec_spec.py converts a `CodecChoice` to and from the proto's
`CompressionSpec`. Both sides use the same choice: the coordinator's policy makes one per
worker, the worker's pipeline wire and averaging rounds encode with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CODECS: tuple[str, ...] = (
    "none",
    "float16",
    "bfloat16",
    "blockwise_8bit",
    "blockwise_4bit",
    "topk_4bit",
    "powersgd",
)

# codecs that send a small part of each tensor and carry the rest over (error feedback): the
# policy averages with them only when no dense codec fits (coordinator/planning/compression_policy.py)
SPARSE_CODECS = frozenset({"topk_4bit", "powersgd"})
# codecs an activation or its gradient may cross a stage boundary with: the sparse ones would
# drop ~99% of each, and a micro-batch's activations have no later call to carry the rest into
ACTIVATION_CODECS: tuple[str, ...] = tuple(c for c in CODECS if c not in SPARSE_CODECS)

DEFAULT_BLOCK_SIZE = 64  # values per fp32 scale in blockwise codecs (and top-k's kept values)
DEFAULT_TOPK_FRACTION = 0.01  # share of values top-k keeps
DEFAULT_RANK = 4  # PowerSGD rank


def unknown_codec(name: object) -> str:
    """The one-line refusal of a codec name that is not in CODECS."""
    return f"unknown codec {name!r}; valid: {', '.join(CODECS)}"


@dataclass(frozen=True)
class CodecChoice:
    """A codec and every parameter it may use; parameters a codec does not use are carried unused."""

    name: str = "none"
    block_size: int = DEFAULT_BLOCK_SIZE
    topk_fraction: float = DEFAULT_TOPK_FRACTION
    rank: int = DEFAULT_RANK

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(unknown_codec(self.name))
        if type(self.block_size) is not int or self.block_size <= 0:
            raise ValueError(f"block_size must be a positive int (got {self.block_size!r})")
        if not (isinstance(self.topk_fraction, int | float) and math.isfinite(self.topk_fraction)
                and 0 < self.topk_fraction <= 1):
            raise ValueError(f"topk_fraction must be in (0, 1] (got {self.topk_fraction!r})")
        if type(self.rank) is not int or self.rank <= 0:
            raise ValueError(f"rank must be a positive int (got {self.rank!r})")

    @property
    def carries_activations(self) -> bool:
        return self.name in ACTIVATION_CODECS

    @property
    def sparse(self) -> bool:
        return self.name in SPARSE_CODECS

    def describe(self) -> str:
        """The name, with the parameter that tells two choices of a sparse codec apart."""
        if self.name == "topk_4bit":
            return f"{self.name} ({self.topk_fraction:.2%} kept)"
        if self.name == "powersgd":
            return f"{self.name} rank {self.rank}"
        return self.name
