"""`powersgd`: rank-r approximation by one warm-started power iteration (Vogels et al., 2019).

A tensor of shape (n, ...) is viewed as an n x m matrix M, m = numel / n. With the codec's
Q (m x r, kept per matrix shape from the previous call, random at first):
P = M Q, orthonormalised (torch.linalg.qr); Q = M^T P; P and Q (fp32) are sent and
decoded as P Q^T. When the start is nearly orthogonal to part of M's row space, encode takes
a second power iteration, so that fp32 rounding does not swamp P. A matrix of rank <= r comes back exactly (up to float rounding); others
get the best rank-r approximation in the span that successive calls refine, so the codec is
meant to be used through `ErrorFeedback`, which sends what each call misses in later ones.
One codec serves one tensor stream (its Q is that stream's warm start).

Which tensors go low rank: those of 2 dims or more whose factors take at most half the
values of the matrix, 2 r (n + m) <= n m. The rest (0-d and 1-D tensors, small or thin
matrices) are sent as fp32, as is: they are a tiny share of a model's values.
Decoding to float16 or bfloat16 saturates at the dtype's largest value, which the
approximation of values near it may overshoot.

Parts: P (float32, n r) and Q (float32, m r); or the values (float32, numel).
Ratio over fp32: r (n + m) / (n m) for low rank, else 1 (a planning figure: 0.01).
"""

from __future__ import annotations

import math

import torch

from worker.compression.base import (
    MAX_NUMEL,
    MAX_RANK,
    CodecError,
    Encoded,
    bool_param,
    call_seed,
    finish,
    header,
    int_param,
    prepare,
    read_header,
    read_parts,
    require_finite_input,
    to_wire,
)

# a diagonal of R in qr(M Q) below this share of |M|: fp32 rounding would swamp P (see encode)
_MISALIGNED = 0.05


def low_rank_dims(shape: tuple[int, ...], rank: int) -> tuple[int, int] | None:
    """(n, m) when a tensor of `shape` goes low rank at `rank`, else None (sent as is)."""
    if len(shape) < 2:
        return None
    n = shape[0]
    m = math.prod(shape[1:])
    if n == 0 or m == 0 or 2 * rank * (n + m) > n * m:
        return None
    return n, m


class PowerSGD:
    name = "powersgd"

    def __init__(self, rank: int = 4, *, seed: int = 0) -> None:
        if type(rank) is not int or not 1 <= rank <= MAX_RANK:
            raise CodecError(f"rank must be an int in [1, {MAX_RANK}], got {rank!r}")
        if type(seed) is not int:
            raise CodecError(f"seed must be an int, got {seed!r}")
        self.rank = rank
        self.seed = seed
        self._warm: dict[tuple[int, int, str], torch.Tensor] = {}

    def _start(self, n: int, m: int, device: torch.device) -> torch.Tensor:
        """Q for the next power iteration: the last one for this shape, columns normalised.

        Columns that vanished (a zero matrix leaves Q = 0) or are not finite are drawn afresh.
        """
        warm = self._warm.get((n, m, str(device)))
        if warm is not None:
            norms = warm.norm(dim=0)
            usable = torch.isfinite(norms) & (norms > 1e-30)
            if bool(usable.all()):
                return warm / norms
        generator = torch.Generator().manual_seed(call_seed(self.seed, n * 1_000_003 + m))
        fresh = torch.randn(m, self.rank, generator=generator).to(device)
        fresh /= fresh.norm(dim=0)
        if warm is None:
            return fresh
        return torch.where(usable, warm / torch.where(usable, norms, 1.0), fresh)

    def encode(self, tensor: torch.Tensor) -> Encoded:
        source = prepare(tensor)
        flat = source.flat
        require_finite_input(flat, source.shape)
        dims = low_rank_dims(source.shape, self.rank)
        if dims is None:
            return Encoded(
                to_wire(flat.clone()), header(self.name, source, rank=self.rank, lowrank=False)
            )
        n, m = dims
        matrix = flat.view(n, m)
        p, r = torch.linalg.qr(matrix @ self._start(n, m, flat.device))
        if bool((r.diagonal().abs() < _MISALIGNED * matrix.norm()).any()):
            # A start nearly orthogonal to (part of) M's row space leaves a column of P at the
            # size of M's fp32 rounding error, mostly noise. One more power iteration
            # (M^T P lies in the row space) brings it back; it costs two more products.
            p = torch.linalg.qr(matrix @ (matrix.T @ p)).Q
        q = matrix.T @ p
        if not (bool(torch.isfinite(p).all()) and bool(torch.isfinite(q).all())):
            raise CodecError(f"tensor {source.shape} has values too large for a low-rank approximation")
        self._warm[(n, m, str(flat.device))] = q.clone()
        return Encoded(to_wire(p, q), header(self.name, source, rank=self.rank, lowrank=True))

    def decode(
        self, encoded: Encoded, *, device: torch.device | str | None = None, max_numel: int = MAX_NUMEL
    ) -> torch.Tensor:
        head = read_header(
            encoded,
            self.name,
            {"rank": int_param("rank", 1, MAX_RANK), "lowrank": bool_param("lowrank")},
            max_numel,
        )
        rank, lowrank = head.params["rank"], head.params["lowrank"]
        dims = low_rank_dims(head.shape, rank)
        if lowrank != (dims is not None):
            raise CodecError(
                f"{self.name} shape {list(head.shape)} at rank {rank} is sent "
                f"{'low rank' if dims else 'as is'}, meta says lowrank={lowrank}"
            )
        if dims is None:
            (values,) = read_parts(encoded, self.name, [(torch.float32, head.numel)], device)
            return finish(values.clone(), head, self.name)
        n, m = dims
        p, q = read_parts(encoded, self.name, [(torch.float32, n * rank), (torch.float32, m * rank)], device)
        # the approximation may overshoot the input's range: float16 saturates at +-65504
        return finish(p.view(n, rank) @ q.view(m, rank).T, head, self.name, saturate=True)

    def expected_ratio(self, shape: tuple[int, ...]) -> float:
        dims = low_rank_dims(tuple(shape), self.rank)
        if dims is None:
            return 1.0
        n, m = dims
        return self.rank * (n + m) / (n * m)

    def __repr__(self) -> str:
        return f"PowerSGD(rank={self.rank}, seed={self.seed})"
