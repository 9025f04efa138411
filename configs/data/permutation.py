"""A seeded permutation of 0..n-1 that is computed per index, never stored.

A shuffled order of a billion sequences would take 8 GB as an index array and seconds to
draw at every epoch; a keyed Feistel network gives the same kind of order in O(1) memory:
`SeededPermutation(n, seed)(positions)` maps positions of the epoch to sequence ids, for
any positions, in any order. The network permutes 0..4**k-1 (the smallest k that covers n);
ids at or above n walk the cycle on (apply the network again) until they land below n, which
keeps the map a bijection of 0..n-1 and takes fewer than four steps on average.

The bit mixing is splitmix64's finalizer, written out here so the order depends on nothing
but (n, seed): two machines, numpy versions or Python versions give the same order.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SeededPermutation"]

_ROUNDS = 4  # enough mixing for a training order; this is not cryptography
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


class SeededPermutation:
    """A bijection of 0..n-1 drawn from `seed` (a sequence of non-negative integers, or one)."""

    def __init__(self, n: int, seed: int | tuple[int, ...]) -> None:
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1 (got {n})")
        self.n = n
        self._half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
        self._mask = np.uint64((1 << self._half_bits) - 1)
        words = list(seed) if isinstance(seed, tuple) else [seed]
        self._keys = np.random.SeedSequence(words).generate_state(_ROUNDS, np.uint64)

    def _network(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self._half_bits)
        left, right = x >> shift, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (_mix(right ^ key) & self._mask)
        return (left << shift) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The ids at `positions` (each in 0..n-1) of the permuted order, as int64."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.n):
            raise IndexError(f"positions must be in 0..{self.n - 1}")
        x = positions.astype(np.uint64)
        with np.errstate(over="ignore"):  # the multiplications are meant to wrap modulo 2**64
            x = self._network(x)
            outside = x >= np.uint64(self.n)
            while outside.any():
                x[outside] = self._network(x[outside])
                outside = x >= np.uint64(self.n)
        return x.astype(np.int64)
