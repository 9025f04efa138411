"""half_size_ends: a step's samples as microbatches whose first and last are half the size."""

from __future__ import annotations

import torch

from worker.pipeline.driver import half_size_ends


def _microbatches(sizes: list[int], seq: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out, start = [], 0
    for size in sizes:
        ids = torch.arange(start, start + size).repeat_interleave(seq).view(size, seq)
        out.append((ids, ids + 1000))
        start += size
    return out


def test_the_ends_are_halved_and_the_samples_keep_their_order() -> None:
    given = _microbatches([8, 8, 8])
    cut = half_size_ends(given)
    assert [int(x.size(0)) for x, _ in cut] == [4, 8, 8, 4]
    torch.testing.assert_close(torch.cat([x for x, _ in cut]), torch.cat([x for x, _ in given]))
    torch.testing.assert_close(torch.cat([y for _, y in cut]), torch.cat([y for _, y in given]))
    assert all(x.shape[1] == 5 for x, _ in cut)


def test_odd_sizes_put_the_extra_sample_at_the_end() -> None:
    assert [int(x.size(0)) for x, _ in half_size_ends(_microbatches([5, 5]))] == [2, 5, 3]


def test_what_cannot_be_halved_is_left_as_it_is() -> None:
    for sizes in ([8], [1, 1], [8, 4], []):
        given = _microbatches(sizes)
        cut = half_size_ends(given)
        assert len(cut) == len(given) and all(a is c for (a, _), (c, _) in zip(given, cut))
