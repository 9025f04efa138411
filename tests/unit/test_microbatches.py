"""How a step's samples are cut into microbatches: evenly on fast links, with halved first and
last microbatches where their transfers would leave the pipeline idle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from worker.pipeline.microbatches import EXPOSED_S, activation_seconds, microbatch_sizes, recut


def test_fast_links_keep_even_microbatches() -> None:
    assert microbatch_sizes(16, 8, EXPOSED_S / 2) == [8, 8]
    assert microbatch_sizes(20, 8, 0.0) == [8, 8, 4]


def test_thin_links_halve_the_first_and_last_microbatch() -> None:
    assert microbatch_sizes(16, 8, 0.03) == [4, 8, 4]
    assert microbatch_sizes(32, 8, 0.03) == [4, 8, 8, 8, 4]
    assert microbatch_sizes(8, 8, 0.03) == [4, 4]
    assert microbatch_sizes(4, 1, 0.03) == [1, 1, 1, 1]  # nothing to halve


@given(batch=st.integers(1, 200), micro=st.integers(1, 64), transfer=st.floats(0, 1))
def test_sizes_always_cut_the_whole_step_into_positive_pieces_no_larger_than_micro(
        batch: int, micro: int, transfer: float) -> None:
    sizes = microbatch_sizes(batch, micro, transfer)
    assert sum(sizes) == batch and all(0 < s <= max(1, min(micro, batch)) for s in sizes)


def test_a_20_mbit_link_with_4_bit_activations_is_thin_for_the_tiny_model() -> None:
    # 8 x 128 tokens of 128 values at 4.5 bits (4-bit codes and a scale per 64) over 20 Mbit/s: ~30 ms
    assert activation_seconds(8, 128, 128, 4.5 / 32, 20e6) == pytest.approx(0.0295, rel=0.01)


def test_recut_keeps_every_sample_in_order() -> None:
    batches = [(torch.arange(8 * i, 8 * i + 8).view(8, 1), -torch.arange(8 * i, 8 * i + 8).view(8, 1))
               for i in range(2)]
    pieces = recut(batches, [4, 8, 4])
    assert [int(x.size(0)) for x, _ in pieces] == [4, 8, 4]
    assert torch.equal(torch.cat([x for x, _ in pieces]).view(-1), torch.arange(16))
    assert torch.equal(torch.cat([y for _, y in pieces]).view(-1), -torch.arange(16))
    with pytest.raises(ValueError, match="do not cut 16 samples"):
        recut(batches, [8, 4])
