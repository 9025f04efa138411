"""Blockwise absmax quantisation: `blockwise_8bit` and `blockwise_4bit`.

The flattened tensor is cut into blocks of `block_size` values (the last one may be short).
Each block sends its absmax as one fp32 scale, and each value the integer nearest to
value / absmax * Q, with Q = 127 for 8 bits and Q = 7 for 4 bits. Decoding multiplies the
code by absmax / Q, so each value is off by at most absmax / (2Q) (plus float rounding):
absmax/254 at 8 bits, absmax/14 at 4 bits.

Parts: codes (uint8: an int8 in [-127, 127] per value at 8 bits; at 4 bits code + 7, two per
byte, the even element in the low nibble, a zero nibble after an odd count), then the
scales (float32, one per block).
Ratio over fp32, n values: (ceil(n * bits / 8) + 4 * ceil(n / B)) / (4n), which is
(bits * B + 32) / (32 * B) when B divides n (configs.compression.blockwise_ratio).
"""

from __future__ import annotations

import math

import torch

from worker.compression.base import (
    MAX_BLOCK_SIZE,
    MAX_NUMEL,
    QMAX,
    CodecError,
    Encoded,
    blocks,
    dequantize,
    finish,
    header,
    int_param,
    pack4,
    prepare,
    quantize,
    read_header,
    read_parts,
    require_finite_scales,
    to_wire,
    unpack4,
)


def code_bytes(numel: int, bits: int) -> int:
    return -(-numel * bits // 8)


class Blockwise:
    """`bits`-bit codes with one fp32 absmax per block of `block_size` values."""

    def __init__(self, bits: int, block_size: int = 64) -> None:
        if bits not in QMAX:
            raise CodecError(f"blockwise codes are 8 or 4 bits, got {bits}")
        if type(block_size) is not int or not 1 <= block_size <= MAX_BLOCK_SIZE:
            raise CodecError(f"block_size must be an int in [1, {MAX_BLOCK_SIZE}], got {block_size!r}")
        self.bits = bits
        self.block_size = block_size
        self.name = f"blockwise_{bits}bit"

    def encode(self, tensor: torch.Tensor) -> Encoded:
        source = prepare(tensor)
        codes, absmax = quantize(source.flat, self.block_size, QMAX[self.bits])
        wire = codes.view(torch.uint8) if self.bits == 8 else pack4(codes)
        return Encoded(to_wire(wire, absmax), header(self.name, source, block_size=self.block_size))

    def decode(
        self, encoded: Encoded, *, device: torch.device | str | None = None, max_numel: int = MAX_NUMEL
    ) -> torch.Tensor:
        head = read_header(
            encoded, self.name, {"block_size": int_param("block_size", 1, MAX_BLOCK_SIZE)}, max_numel
        )
        block_size = head.params["block_size"]
        wire, absmax = read_parts(
            encoded,
            self.name,
            [
                (torch.uint8, code_bytes(head.numel, self.bits)),
                (torch.float32, blocks(head.numel, block_size)),
            ],
            device,
        )
        require_finite_scales(absmax, self.name)
        if self.bits == 8:
            codes, offset = wire.view(torch.int8), 0
            if head.numel and int(codes.min()) == -128:
                raise CodecError(f"{self.name} holds the code -128 (codes are in [-127, 127])")
        else:
            codes, offset = unpack4(wire, head.numel, self.name), QMAX[4]
        values = dequantize(codes, absmax, block_size, QMAX[self.bits], offset)
        return finish(values, head, self.name)

    def expected_ratio(self, shape: tuple[int, ...]) -> float:
        numel = math.prod(shape)
        if numel == 0:
            return (self.bits * self.block_size + 32) / (32 * self.block_size)
        return (code_bytes(numel, self.bits) + 4 * blocks(numel, self.block_size)) / (4 * numel)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(block_size={self.block_size})"


class Blockwise8Bit(Blockwise):
    def __init__(self, block_size: int = 64) -> None:
        super().__init__(8, block_size)


class Blockwise4Bit(Blockwise):
    def __init__(self, block_size: int = 64) -> None:
        super().__init__(4, block_size)
