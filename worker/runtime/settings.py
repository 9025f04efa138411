"""What an assignment's codec specs mean to the worker: the pipeline's codec, the averaging settings, a label."""

from __future__ import annotations

from typing import Any

from configs.compression import CODECS
from protos import swarmtrain_pb2 as pb
from worker.replicas.diloco import OuterSettings


def codec_name(spec: pb.CompressionSpec) -> str:
    """The pipeline's name for the assignment's activation codec: 'float16' for one it does not know."""
    known = spec.codec in pb.Codec.values() and spec.codec != pb.CODEC_UNSPECIFIED
    name = pb.Codec.Name(spec.codec).removeprefix("CODEC_").lower() if known else ""
    return name if name in CODECS else "float16"


def outer_settings(assignment: pb.Assignment, training: Any) -> OuterSettings:
    """The stage's averaging: the run's outer optimizer and the assignment's sync codec."""
    spec = assignment.sync_compression
    known = spec.codec in pb.Codec.values() and spec.codec != pb.CODEC_UNSPECIFIED
    codec = pb.Codec.Name(spec.codec).removeprefix("CODEC_").lower() if known else "none"
    return OuterSettings(lr=training.outer_learning_rate, momentum=training.outer_momentum, codec=codec,
                         block_size=spec.block_size or 64, topk_fraction=spec.topk_fraction or 0.01,
                         rank=spec.rank or 4)


def describe_codec(spec: pb.CompressionSpec) -> str:
    known = spec.codec in pb.Codec.values()
    name = pb.Codec.Name(spec.codec).removeprefix("CODEC_").lower() if known else f"codec {spec.codec}"
    if spec.codec == pb.CODEC_TOPK_4BIT and spec.topk_fraction:
        return f"{name} ({spec.topk_fraction:.2%} kept)"
    if spec.codec == pb.CODEC_POWERSGD and spec.rank:
        return f"{name} rank {spec.rank}"
    return name
