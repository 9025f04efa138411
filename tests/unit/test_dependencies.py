"""The dependency pins hold: hivemind's 8-bit codecs decode with the numpy we allow."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto.runtime_pb2 import CompressionType
from packaging.version import Version


def test_numpy_is_below_the_release_that_breaks_hivemind_8bit() -> None:
    assert Version(np.__version__) < Version("2.4"), "pyproject pins numpy<2.4; see the comment there"


@pytest.mark.parametrize(
    ("codec", "tolerance"),
    [("FLOAT16", 1e-2), ("MEANSTD_16BIT", 1e-2), ("UNIFORM_8BIT", 0.5), ("QUANTILE_8BIT", 0.5)],
)
def test_hivemind_codecs_round_trip(codec: str, tolerance: float) -> None:
    tensor = torch.randn(257, 33, generator=torch.Generator().manual_seed(0))
    restored = deserialize_torch_tensor(serialize_torch_tensor(tensor, getattr(CompressionType, codec)))
    assert restored.shape == tensor.shape
    # mean error, not max: the 8-bit codecs clip their tails by design
    assert (restored - tensor).abs().mean().item() < tolerance
