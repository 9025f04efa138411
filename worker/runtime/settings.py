"""What an assignment's codec specs mean to the worker: the pipeline's codec, the averaging settings, a label.

Every spec is read by protos.codec_spec.from_spec, whose one rule covers what this release does not
know: an unknown or unspecified codec reads as `none`, unset parameters as their defaults.
"""

from __future__ import annotations

from typing import Any

from configs.codecs import CodecChoice
from protos import swarmtrain_pb2 as pb
from protos.codec_spec import from_spec
from worker.replicas.diloco import OuterSettings


def activation_choice(spec: pb.CompressionSpec) -> CodecChoice:
    """The assignment's activation codec with its parameters, as the pipeline wire takes it."""
    return from_spec(spec)


def codec_name(spec: pb.CompressionSpec) -> str:
    """The name of the assignment's activation codec (its parameters: `activation_choice`)."""
    return from_spec(spec).name


def outer_settings(assignment: pb.Assignment, training: Any) -> OuterSettings:
    """The stage's averaging: the run's outer optimizer and the assignment's sync codec."""
    return OuterSettings(lr=training.outer_learning_rate, momentum=training.outer_momentum,
                         codec=from_spec(assignment.sync_compression))


def describe_codec(spec: pb.CompressionSpec) -> str:
    return from_spec(spec).describe()
