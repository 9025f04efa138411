"""Codecs that cast: `none` (fp32 as is), `float16` and `bfloat16` (one 2-byte value per element).

Parts: one flat tensor of the wire dtype (float32, float16 or bfloat16). Values outside the
wire dtype's range are refused rather than sent as infinities (float16 tops out at 65504).
Ratios: 1, 0.5, 0.5. Error: none is exact for float32, float16 and bfloat16 inputs;
float16 rounds to 11 significant bits (relative error at most 2^-11, absolute 2^-25 below
2^-14), bfloat16 to 8 (relative error at most 2^-8).
"""

from __future__ import annotations

import torch

from worker.compression.base import (
    MAX_NUMEL,
    CodecError,
    Encoded,
    all_finite,
    finish,
    header,
    prepare,
    read_header,
    read_parts,
    to_wire,
)


class Cast:
    """Send every value as `wire_dtype`."""

    name: str
    wire_dtype: torch.dtype

    def __init__(self, name: str, wire_dtype: torch.dtype) -> None:
        self.name = name
        self.wire_dtype = wire_dtype

    def encode(self, tensor: torch.Tensor) -> Encoded:
        source = prepare(tensor)
        wire = source.flat.to(self.wire_dtype, copy=True)  # never aliases the caller's tensor
        if not all_finite(wire):
            raise CodecError(
                f"tensor {source.shape} holds NaN or infinite values, or values beyond "
                f"{self.wire_dtype}'s range; refusing to encode it"
            )
        return Encoded(to_wire(wire), header(self.name, source))

    def decode(
        self, encoded: Encoded, *, device: torch.device | str | None = None, max_numel: int = MAX_NUMEL
    ) -> torch.Tensor:
        head = read_header(encoded, self.name, {}, max_numel)
        (wire,) = read_parts(encoded, self.name, [(self.wire_dtype, head.numel)], device)
        if wire.dtype == head.dtype:
            wire = wire.clone()  # the result never aliases the parts
        return finish(wire, head, self.name)

    def expected_ratio(self, shape: tuple[int, ...]) -> float:
        return torch.finfo(self.wire_dtype).bits / 32

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoCompression(Cast):
    def __init__(self) -> None:
        super().__init__("none", torch.float32)


class Float16(Cast):
    def __init__(self) -> None:
        super().__init__("float16", torch.float16)


class BFloat16(Cast):
    def __init__(self) -> None:
        super().__init__("bfloat16", torch.bfloat16)
