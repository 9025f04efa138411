"""One typed codec choice: its defaults, its proto form both ways, and what each side reads from it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from configs.codecs import ACTIVATION_CODECS, CODECS, SPARSE_CODECS, CodecChoice
from configs.compression import CompressionPolicy
from protos import swarmtrain_pb2 as pb
from protos.codec_spec import from_spec, to_spec
from worker.compression import codec_for, decode_any
from worker.replicas.diloco import OuterSettings
from worker.runtime.settings import activation_choice, codec_name, describe_codec, outer_settings


@pytest.mark.parametrize("name", CODECS)
def test_a_choice_survives_the_proto(name: str) -> None:
    choice = CodecChoice(name, block_size=128, topk_fraction=0.05, rank=8)
    spec = pb.CompressionSpec.FromString(to_spec(choice).SerializeToString())
    assert pb.Codec.Name(spec.codec) == f"CODEC_{name.upper()}"
    assert from_spec(spec) == choice


def test_one_rule_for_what_the_proto_leaves_unsaid() -> None:
    # an unspecified or unknown codec is `none`; a parameter of 0 (proto3's unset) is its default
    assert from_spec(pb.CompressionSpec()) == CodecChoice() == CodecChoice("none")
    assert from_spec(pb.CompressionSpec(codec=99, block_size=32)) == CodecChoice("none", block_size=32)
    assert from_spec(pb.CompressionSpec(codec=pb.CODEC_TOPK_4BIT)) == CodecChoice("topk_4bit")
    with pytest.raises(ValueError, match="topk_fraction"):
        from_spec(pb.CompressionSpec(codec=pb.CODEC_TOPK_4BIT, topk_fraction=1.5))


def test_the_defaults_are_one_set() -> None:
    policy = CompressionPolicy()
    default = CodecChoice()
    assert (policy.block_size, policy.topk_fraction, policy.powersgd_rank) == \
        (default.block_size, default.topk_fraction, default.rank)
    assert OuterSettings().codec == default
    assert policy.choice("topk_4bit") == CodecChoice("topk_4bit")


@pytest.mark.parametrize("fields", [
    {"name": "gzip"}, {"block_size": 0}, {"block_size": 2.5}, {"topk_fraction": 0.0}, {"topk_fraction": 1.5},
    {"topk_fraction": float("nan")}, {"rank": 0},
])
def test_a_bad_choice_is_refused(fields: dict) -> None:
    with pytest.raises(ValueError):
        CodecChoice(**fields)


def test_activation_codecs_are_the_dense_ones() -> None:
    assert set(ACTIVATION_CODECS) == set(CODECS) - SPARSE_CODECS
    assert all(CodecChoice(c).carries_activations for c in ACTIVATION_CODECS)
    assert not any(CodecChoice(c).carries_activations for c in SPARSE_CODECS)


def test_the_worker_reads_an_assignment_s_specs() -> None:
    activation = to_spec(CodecChoice("blockwise_8bit", block_size=256))
    sync = to_spec(CodecChoice("topk_4bit", topk_fraction=0.05))
    assignment = pb.Assignment(activation_compression=activation, sync_compression=sync)
    training = SimpleNamespace(outer_learning_rate=0.7, outer_momentum=0.9)
    assert codec_name(activation) == "blockwise_8bit"
    assert activation_choice(activation) == CodecChoice("blockwise_8bit", block_size=256)
    settings = outer_settings(assignment, training)
    assert settings == OuterSettings(lr=0.7, momentum=0.9, codec="topk_4bit", topk_fraction=0.05)
    assert settings.codec == CodecChoice("topk_4bit", topk_fraction=0.05)
    assert describe_codec(sync) == "topk_4bit (5.00% kept)"
    assert describe_codec(to_spec(CodecChoice("powersgd", rank=2))) == "powersgd rank 2"
    assert describe_codec(activation) == "blockwise_8bit"
    assert codec_name(pb.CompressionSpec()) == describe_codec(pb.CompressionSpec(codec=42)) == "none"


def test_outer_settings_take_a_choice_or_a_name() -> None:
    assert OuterSettings(codec="blockwise_4bit", block_size=32).codec == CodecChoice("blockwise_4bit", 32)
    with pytest.raises(ValueError, match="in the CodecChoice"):
        OuterSettings(codec=CodecChoice("blockwise_4bit"), block_size=32)


def test_a_codec_is_built_from_a_choice() -> None:
    tensor = torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    encoded = codec_for(CodecChoice("blockwise_8bit", block_size=100)).encode(tensor)
    assert encoded.meta["block_size"] == 100 and encoded.parts[1].numel() == 12  # one scale per 100 values
    assert decode_any(encoded).shape == tensor.shape
