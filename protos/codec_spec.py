"""A `configs.codecs.CodecChoice` as the wire contract's `CompressionSpec`, and back.

The only place codec names meet the proto's `Codec` enum: `CODEC_<NAME>` upper-cased. Both
directions are total on what the other produces; reading is lenient where proto3 leaves no
choice, and the rule is one: a `Codec` value this release does not know, or
`CODEC_UNSPECIFIED`, reads as `none` (every peer decodes it and it changes no value; it only
costs bandwidth), and a parameter of 0 (proto3's unset) reads as its default.
"""

from __future__ import annotations

from configs.codecs import CODECS, DEFAULT_BLOCK_SIZE, DEFAULT_RANK, DEFAULT_TOPK_FRACTION, CodecChoice
from protos import swarmtrain_pb2 as pb

_TO_ENUM: dict[str, int] = {name: pb.Codec.Value(f"CODEC_{name.upper()}") for name in CODECS}
_FROM_ENUM: dict[int, str] = {value: name for name, value in _TO_ENUM.items()}
if set(_FROM_ENUM) != set(pb.Codec.values()) - {pb.CODEC_UNSPECIFIED}:  # a codec added to one side only
    raise ImportError(f"protos' Codec enum and configs.codecs.CODECS differ: {sorted(pb.Codec.keys())}")


def to_spec(choice: CodecChoice) -> pb.CompressionSpec:
    return pb.CompressionSpec(codec=_TO_ENUM[choice.name], block_size=choice.block_size,
                              topk_fraction=choice.topk_fraction, rank=choice.rank)


def from_spec(spec: pb.CompressionSpec) -> CodecChoice:
    """The choice `spec` names (see the module notes for unknown codecs and unset parameters).

    Parameters out of range (a fraction over 1) raise ValueError: a coordinator validated its own.
    """
    return CodecChoice(
        name=_FROM_ENUM.get(spec.codec, "none"),
        block_size=spec.block_size or DEFAULT_BLOCK_SIZE,
        topk_fraction=spec.topk_fraction or DEFAULT_TOPK_FRACTION,
        rank=spec.rank or DEFAULT_RANK,
    )

