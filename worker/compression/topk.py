"""`topk_4bit`: random sample, top-k by magnitude within it, kept values quantised to 4 bits.

After CocktailSGD (Wang et al., 2023). Encoding draws one candidate from every run of
`stride` consecutive values (a stratified random sample of about 1/stride of them), keeps
the `ceil(topk_fraction * n)` candidates of largest magnitude, and sends their positions
(int32, ascending), their values as 4-bit codes with one fp32 absmax per `block_size` kept
values (as blockwise_4bit does), and nothing else: decoding scatters them into zeros.
The stride is `round(1 / sample_fraction)` (10 by default), lowered so that the sample
always holds at least twice the values kept (1, plain top-k, from topk_fraction 0.25 up).

The sample is drawn with a torch.Generator seeded from `seed` and the codec's call counter,
so a sender's choices are reproducible (on one device type). Receivers need neither.

Meant to be used through `ErrorFeedback`, which carries what was not sent into the next
call; alone it drops ~99% of every tensor. One codec serves one tensor stream.

Parts: indices (int32, k), codes (uint8, ceil(k / 2)), scales (float32, ceil(k / B)).
Ratio over fp32, k kept of n: (4k + ceil(k / 2) + 4 ceil(k / B)) / (4n), about
topk_fraction * (36 + 32 / B) / 32 (the fp32 scales add 32 / B bits to each kept value).
Error: a kept value is off by at most the absmax of its block / 14; the rest decode to 0.
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
    call_seed,
    dequantize,
    finish,
    header,
    int_param,
    pack4,
    prepare,
    quantize,
    read_header,
    read_parts,
    require_finite_input,
    require_finite_scales,
    to_wire,
    unpack4,
)


class TopK4Bit:
    name = "topk_4bit"

    def __init__(
        self, topk_fraction: float = 0.01, *, block_size: int = 64, seed: int = 0, sample_fraction: float = 0.1
    ) -> None:
        for key, value in (("topk_fraction", topk_fraction), ("sample_fraction", sample_fraction)):
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= 1:
                raise CodecError(f"{key} must be in (0, 1], got {value!r}")
        if type(block_size) is not int or not 1 <= block_size <= MAX_BLOCK_SIZE:
            raise CodecError(f"block_size must be an int in [1, {MAX_BLOCK_SIZE}], got {block_size!r}")
        if type(seed) is not int:
            raise CodecError(f"seed must be an int, got {seed!r}")
        self.topk_fraction = float(topk_fraction)
        self.block_size = block_size
        self.seed = seed
        self.stride = max(1, min(round(1 / sample_fraction), math.floor(1 / (2 * self.topk_fraction))))
        self.calls = 0

    def keep_count(self, numel: int) -> int:
        """How many of `numel` values are kept: ceil(topk_fraction * numel), at least 1 of a non-empty tensor."""
        if numel == 0:
            return 0
        wanted = math.ceil(round(self.topk_fraction * numel, 6))
        return max(1, min(wanted, -(-numel // self.stride)))

    def encode(self, tensor: torch.Tensor) -> Encoded:
        source = prepare(tensor)
        flat = source.flat
        require_finite_input(flat, source.shape)
        numel, keep = flat.numel(), self.keep_count(flat.numel())
        generator = torch.Generator(device=flat.device)
        generator.manual_seed(call_seed(self.seed, self.calls))
        self.calls += 1
        if self.stride > 1 and numel:
            count = -(-numel // self.stride)
            starts = torch.arange(count, device=flat.device) * self.stride
            spans = (numel - starts).clamp_(max=self.stride)
            jitter = torch.rand(count, generator=generator, device=flat.device).mul_(spans).long()
            candidates = starts.add_(torch.minimum(jitter, spans - 1))
            magnitudes = flat[candidates].abs_()
        else:
            candidates, magnitudes = None, flat.abs()
        # a mask rather than a sort puts the kept positions in ascending order in O(candidates)
        chosen = torch.zeros(magnitudes.numel(), dtype=torch.bool, device=flat.device)
        chosen[torch.topk(magnitudes, keep, sorted=False).indices] = True
        index = candidates[chosen] if candidates is not None else chosen.nonzero().view(-1)
        codes, absmax = quantize(flat[index], self.block_size, QMAX[4])
        return Encoded(
            to_wire(index.to(torch.int32), pack4(codes), absmax),
            header(self.name, source, block_size=self.block_size, count=keep),
        )

    def decode(
        self, encoded: Encoded, *, device: torch.device | str | None = None, max_numel: int = MAX_NUMEL
    ) -> torch.Tensor:
        head = read_header(
            encoded,
            self.name,
            {
                "block_size": int_param("block_size", 1, MAX_BLOCK_SIZE),
                "count": int_param("count", 0, MAX_NUMEL),
            },
            max_numel,
        )
        block_size, count = head.params["block_size"], head.params["count"]
        if count > head.numel:
            raise CodecError(f"{self.name} keeps {count:,} of {head.numel:,} values")
        index, packed, absmax = read_parts(
            encoded,
            self.name,
            [
                (torch.int32, count),
                (torch.uint8, -(-count // 2)),
                (torch.float32, blocks(count, block_size)),
            ],
            device,
        )
        require_finite_scales(absmax, self.name)
        if count and not (
            bool(index[0] >= 0) and bool(index[-1] < head.numel) and bool((index[1:] > index[:-1]).all())
        ):
            raise CodecError(f"{self.name} indices must rise strictly within [0, {head.numel:,})")
        values = dequantize(unpack4(packed, count, self.name), absmax, block_size, QMAX[4], QMAX[4])
        out = torch.zeros(head.numel, dtype=torch.float32, device=values.device)
        out[index.long()] = values
        return finish(out, head, self.name)

    def expected_ratio(self, shape: tuple[int, ...]) -> float:
        numel = math.prod(shape)
        if numel == 0:
            return self.topk_fraction * (36 + 32 / self.block_size) / 32
        keep = self.keep_count(numel)
        return (4 * keep + -(-keep // 2) + 4 * blocks(keep, self.block_size)) / (4 * numel)

    def __repr__(self) -> str:
        return (
            f"TopK4Bit(topk_fraction={self.topk_fraction}, block_size={self.block_size}, "
            f"seed={self.seed}, stride={self.stride})"
        )
