"""How the driver cuts a step's samples into microbatches (pure).

A step fills the pipeline with its first microbatch and drains it with its last: the first
one's activations must cross the link before the next stage has anything to compute, and the
last one's gradients must come back before our stage can step. The transfers of the others
overlap computing. On a link where one microbatch's activations take a while to cross
(`transfer_s` above EXPOSED_S), the first and last microbatches are therefore halved, which
halves the time nobody computes; the others keep `micro` samples, so compute stays efficient.
A step trains on the same samples either way (the sums differ only in float rounding order).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# a microbatch's transfer that a step may leave exposed: below this, cutting is not worth it
EXPOSED_S = 0.01

Batch = tuple[torch.Tensor, torch.Tensor]


def microbatch_sizes(batch_size: int, micro: int, transfer_s: float) -> list[int]:
    """Sizes of a step's microbatches, summing to `batch_size`."""
    if batch_size < 1:
        raise ValueError(f"a step needs samples, got batch_size {batch_size}")
    micro = max(1, min(micro, batch_size))
    if transfer_s <= EXPOSED_S or micro < 2:
        return _even(batch_size, micro)
    edge = micro // 2
    return [edge, *_even(batch_size - 2 * edge, micro), edge] if batch_size > 2 * edge else [edge, edge]


def _even(samples: int, micro: int) -> list[int]:
    return [micro] * (samples // micro) + ([samples % micro] if samples % micro else [])


def activation_seconds(micro: int, seq_len: int, d_model: int, ratio: float, upload_bps: float) -> float:
    """How long one microbatch's activations (fp32 values times the codec's `ratio`) take at `upload_bps`."""
    return micro * seq_len * d_model * 4 * ratio * 8 / upload_bps


def recut(batches: Sequence[Batch], sizes: Sequence[int]) -> list[Batch]:
    """The samples of `batches`, in order, cut into microbatches of `sizes`."""
    inputs = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    if sum(sizes) != inputs.size(0):
        raise ValueError(f"sizes {list(sizes)} do not cut {inputs.size(0)} samples")
    return list(zip(inputs.split(list(sizes)), targets.split(list(sizes)), strict=True))
