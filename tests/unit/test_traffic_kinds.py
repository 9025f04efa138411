"""Pipeline bytes by payload kind: a `backward` request's inputs count as activations and its
gradients as gradients, each with its own wire bytes, whatever the codec (worker.pipeline.traffic)."""

from __future__ import annotations

import pytest
import torch

from worker.pipeline.traffic import FrameTally, MessageKinds, nbytes_by_kind
from worker.pipeline.wire import Payload, request_frames

BACKWARD = MessageKinds(("activation", "gradient"), "activation")


def wire_bytes(frames: list) -> int:
    return sum(frame.ByteSize() for frame in frames)


@pytest.mark.parametrize("codec", ["none", "float16", "blockwise_8bit"])
def test_each_tensor_counts_its_own_bytes_and_the_kinds_add_up_to_the_message(codec: str) -> None:
    torch.manual_seed(0)
    inputs, grads = torch.randn(2, 16, 64), torch.randn(2, 16, 64) * 1e-3
    frames = list(request_frames("k", Payload([inputs, grads], roles=["activation", "gradient"]), codec,
                                 chunk_bytes=4096))  # several frames, tensors cut into parts
    split = FrameTally().observe_all(frames).split(BACKWARD)
    assert sum(split.values()) == wire_bytes(frames)
    alone = wire_bytes(list(request_frames("k", Payload([grads], roles=["gradient"]), codec, chunk_bytes=4096)))
    # the gradient's share is its own parts: what it costs alone, less that message's metadata and framing
    assert alone - 600 < split["gradient"] <= alone
    assert split["activation"] > split["gradient"] * 0.9  # inputs: the same size, plus the metadata


def test_a_message_without_tensors_counts_as_its_default_kind() -> None:
    frames = list(request_frames("k", Payload(meta={"error": "x"}), "none"))
    assert FrameTally().observe_all(frames).split(MessageKinds((), "gradient")) == {"gradient": wire_bytes(frames)}
    assert MessageKinds((), "gradient").whole(10) == {"gradient": 10}


def test_uncompressed_bytes_are_the_tensors_own_by_kind() -> None:
    ids, grads = torch.zeros(2, 8, dtype=torch.int64), torch.zeros(2, 8, 4)
    assert nbytes_by_kind([ids, grads, None], BACKWARD) == {"activation": 128, "gradient": 256}
