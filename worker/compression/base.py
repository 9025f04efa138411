"""The codec interface: what an encoded tensor is, and how a receiver decodes one it did not make.

An `Encoded` is a few flat CPU tensors (`parts`, what goes on the wire) and a small JSON
object (`meta`: codec name, original shape and dtype, the parameters a receiver needs).
Receivers do not know the sender's parameters: `decode_any` reads them from `meta`, and
trusts none of it. Before a byte is interpreted the meta keys, types and ranges, the number,
dtypes and lengths of the parts, and their agreement with the declared shape are checked;
any mismatch raises `CodecError` (one line). Decoding allocates at most the declared shape
(itself capped, `MAX_NUMEL`), and refuses parts that decode to NaN or infinite values.
Encoders refuse NaN and infinite inputs: a sender never ships them.

Every codec compresses float tensors of any shape (0-d and empty included); ratios are
against fp32 (4 bytes a value) whatever the input dtype. The codec modules import only this
one; worker.compression.registry names them.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

MAX_DIMS = 8
MAX_NUMEL = 2**31 - 1  # top-k indices are int32; larger tensors are sent in pieces
MAX_BLOCK_SIZE = 2**20
MAX_RANK = 256

# dtypes an Encoded part may have: what goes on the wire
PART_DTYPES = frozenset({torch.uint8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32})
# float dtypes a codec accepts, by the name meta carries
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_DTYPE_NAMES = {dtype: name for name, dtype in FLOAT_DTYPES.items()}


class CodecError(ValueError):
    """A tensor that cannot be encoded, or an encoded one that is inconsistent. `str(err)` is one line."""


@dataclass
class Encoded:
    """A compressed tensor: flat CPU `parts` (the wire bytes) and JSON-serialisable `meta`."""

    parts: list[torch.Tensor]
    meta: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(part.numel() * part.element_size() for part in self.parts)


@runtime_checkable
class Codec(Protocol):
    name: str

    def encode(self, tensor: torch.Tensor) -> Encoded: ...

    def decode(
        self, encoded: Encoded, *, device: torch.device | str | None = None, max_numel: int = MAX_NUMEL
    ) -> torch.Tensor: ...

    def expected_ratio(self, shape: tuple[int, ...]) -> float: ...


# ----------------------------------------------------------------------------- encoding helpers


class Source(NamedTuple):
    """An input tensor made ready to encode: flat float32 on its own device, and what meta says of it."""

    flat: torch.Tensor
    shape: tuple[int, ...]
    dtype: str


def prepare(tensor: torch.Tensor) -> Source:
    """Check an input tensor and view it flat as float32 (a copy only where the dtype or layout needs one)."""
    if not isinstance(tensor, torch.Tensor):
        raise CodecError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _DTYPE_NAMES:
        raise CodecError(f"codecs take float16, bfloat16, float32 or float64 tensors, got {tensor.dtype}")
    if tensor.dim() > MAX_DIMS:
        raise CodecError(f"a tensor of {tensor.dim()} dims (at most {MAX_DIMS})")
    if tensor.numel() > MAX_NUMEL:
        raise CodecError(f"a tensor of {tensor.numel():,} elements (at most {MAX_NUMEL:,}); send it in pieces")
    flat = tensor.detach().reshape(-1).to(torch.float32)
    return Source(flat, tuple(tensor.shape), _DTYPE_NAMES[tensor.dtype])


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite; one reduction (min and max propagate NaN)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def require_finite_input(flat: torch.Tensor, shape: tuple[int, ...]) -> None:
    if not all_finite(flat):
        raise CodecError(f"tensor {shape} holds NaN or infinite values; refusing to encode it")


def header(name: str, source: Source, **params: Any) -> dict[str, Any]:
    return {"codec": name, "shape": list(source.shape), "dtype": source.dtype, **params}


def to_wire(*parts: torch.Tensor) -> list[torch.Tensor]:
    """Parts as flat contiguous CPU tensors."""
    return [part.detach().reshape(-1).contiguous().cpu() for part in parts]


def blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


def pieces(numel: int, block_size: int) -> list[tuple[int, int, int, int]]:
    """(first block, first element, rows, columns) of the whole blocks, then of the short last block.

    Lets blockwise code work on 2-D views of flat tensors without padding them to whole blocks.
    """
    whole = numel // block_size
    out = [(0, 0, whole, block_size)] if whole else []
    if numel > whole * block_size:
        out.append((whole, whole * block_size, 1, numel - whole * block_size))
    return out


# ----------------------------------------------------------------------------- shared by codecs

# blockwise absmax quantisation (blockwise.py, and top-k's kept values) and the seeds of
# codecs that draw random numbers (top-k, PowerSGD): here so each codec imports only this module

QMAX = {8: 127, 4: 7}


def quantize(flat: torch.Tensor, block_size: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int8 in [-qmax, qmax], one per value) and absmax (float32, one per block) of a flat tensor.

    Raises CodecError on NaN or infinite values (a block's absmax is then not finite).
    """
    numel = flat.numel()
    codes = torch.empty(numel, dtype=torch.int8, device=flat.device)
    absmax = torch.empty(blocks(numel, block_size), dtype=torch.float32, device=flat.device)
    for block0, start, rows, cols in pieces(numel, block_size):
        view = flat[start : start + rows * cols].view(rows, cols)
        low, high = torch.aminmax(view, dim=1)
        peak = torch.maximum(high, low.neg())  # NaN propagates
        if not bool(torch.isfinite(peak).all()):
            raise CodecError(f"tensor of {numel:,} values holds NaN or infinite values; refusing to encode it")
        absmax[block0 : block0 + rows] = peak
        # |value / absmax| <= 1 exactly, so the codes need no clamp; all-zero blocks divide by 1
        scaled = view / torch.where(peak > 0, peak, 1.0).unsqueeze(1)
        codes[start : start + rows * cols].view(rows, cols).copy_(scaled.mul_(qmax).round_())
    return codes, absmax


def dequantize(
    codes: torch.Tensor, absmax: torch.Tensor, block_size: int, qmax: int, offset: int = 0
) -> torch.Tensor:
    """Float32 values from codes (int8, or uint8 holding code + `offset`) and per-block absmax."""
    numel = codes.numel()
    out = torch.empty(numel, dtype=torch.float32, device=codes.device)
    step = (absmax / qmax).unsqueeze(1)
    shift = step * -offset
    for block0, start, rows, cols in pieces(numel, block_size):
        view = codes[start : start + rows * cols].view(rows, cols)
        target = out[start : start + rows * cols].view(rows, cols)
        if offset:
            torch.addcmul(shift[block0 : block0 + rows], view, step[block0 : block0 + rows], out=target)
        else:
            torch.mul(view, step[block0 : block0 + rows], out=target)
    return out


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-7, 7] as code + 7, two per byte (even element low); ceil(n / 2) bytes."""
    nibbles = (codes + 7).view(torch.uint8)
    numel, pairs = nibbles.numel(), nibbles.numel() // 2
    packed = torch.empty(numel - pairs, dtype=torch.uint8, device=codes.device)
    even = nibbles[: 2 * pairs].view(pairs, 2)
    torch.bitwise_or(even[:, 0], even[:, 1] << 4, out=packed[:pairs])
    if numel % 2:
        packed[pairs:] = nibbles[-1:]
    return packed


def unpack4(packed: torch.Tensor, numel: int, name: str) -> torch.Tensor:
    """`pack4`'s nibbles (code + 7, uint8); raises CodecError on one outside [0, 14] or a set padding nibble."""
    nibbles = torch.stack((packed & 15, packed >> 4), dim=1).view(-1)
    if (numel and int(nibbles[:numel].max()) > 14) or (nibbles.numel() > numel and int(nibbles[-1]) != 0):
        raise CodecError(f"{name} holds 4-bit codes outside [-7, 7] or a non-zero padding nibble")
    return nibbles[:numel]


_GOLDEN = 0x9E3779B97F4A7C15
_MIX = 0xBF58476D1CE4E5B9


def call_seed(seed: int, call: int) -> int:
    """The generator seed of call number `call` of a codec seeded with `seed`."""
    return (seed * _GOLDEN + (call + 1) * _MIX) % 2**63


# ----------------------------------------------------------------------------- decoding helpers


class Header(NamedTuple):
    shape: tuple[int, ...]
    numel: int
    dtype: torch.dtype
    params: dict[str, Any]


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict = 2, 8, 8, 4
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 40


def short_repr(value: Any) -> str:
    """A bounded repr of a value a peer sent (any size, any nesting)."""
    try:
        return _SHORT.repr(value)
    except ValueError:  # an int beyond Python's str conversion limit
        return f"<{type(value).__name__}>"


def read_header(
    encoded: Encoded, name: str, params: dict[str, Callable[[Any], Any]], max_numel: int
) -> Header:
    """Check `meta` holds exactly codec, shape, dtype and `params` (each checked by its function)."""
    if not isinstance(encoded, Encoded):
        raise CodecError(f"expected an Encoded, got {type(encoded).__name__}")
    meta = encoded.meta
    if not isinstance(meta, dict):
        raise CodecError(f"meta must be a dict, got {type(meta).__name__}")
    if meta.get("codec") != name:
        raise CodecError(f"meta names codec {short_repr(meta.get('codec'))}, this decoder is {name!r}")
    expected = {"codec", "shape", "dtype", *params}
    if set(meta) != expected:
        extra, missing = set(map(str, meta)) - expected, expected - set(meta)
        raise CodecError(
            f"{name} meta keys wrong: unexpected {sorted(extra)}, missing {sorted(missing)}"
        )
    shape = meta["shape"]
    if not isinstance(shape, list | tuple) or len(shape) > MAX_DIMS:
        raise CodecError(f"shape must be a list of at most {MAX_DIMS} sizes, got {short_repr(shape)}")
    if not all(type(size) is int and 0 <= size <= MAX_NUMEL for size in shape):
        raise CodecError(f"shape sizes must be ints in [0, {MAX_NUMEL:,}], got {short_repr(shape)}")
    numel = math.prod(shape)
    if numel > min(max_numel, MAX_NUMEL):
        cap = min(max_numel, MAX_NUMEL)
        raise CodecError(f"shape {short_repr(shape)} declares {numel:,} elements (at most {cap:,})")
    dtype = meta["dtype"]
    if not isinstance(dtype, str) or dtype not in FLOAT_DTYPES:
        raise CodecError(f"dtype must be one of {', '.join(FLOAT_DTYPES)}, got {short_repr(dtype)}")
    values = {key: check(meta[key]) for key, check in params.items()}
    return Header(tuple(shape), numel, FLOAT_DTYPES[dtype], values)


def int_param(key: str, low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if type(value) is not int or not low <= value <= high:
            raise CodecError(f"{key} must be an int in [{low}, {high}], got {short_repr(value)}")
        return value

    return check


def bool_param(key: str) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if type(value) is not bool:
            raise CodecError(f"{key} must be a bool, got {short_repr(value)}")
        return value

    return check


def read_parts(
    encoded: Encoded,
    name: str,
    layout: list[tuple[torch.dtype, int]],
    device: torch.device | str | None,
) -> list[torch.Tensor]:
    """The parts, checked against `layout` ((dtype, length) each), flat and on `device`."""
    parts = encoded.parts
    if not isinstance(parts, list | tuple) or len(parts) != len(layout):
        count = len(parts) if isinstance(parts, list | tuple) else type(parts).__name__
        raise CodecError(f"{name} needs {len(layout)} parts, got {count}")
    out = []
    for i, (part, (dtype, length)) in enumerate(zip(parts, layout)):
        if not isinstance(part, torch.Tensor):
            raise CodecError(f"{name} part {i} is a {type(part).__name__}, not a tensor")
        if part.dtype != dtype:
            raise CodecError(f"{name} part {i} must be {dtype}, got {part.dtype}")
        if part.dim() != 1 or part.numel() != length:
            raise CodecError(
                f"{name} part {i} must be flat with {length:,} values for the declared shape, "
                f"got shape {tuple(part.shape)}"
            )
        out.append(part.to(device or "cpu"))
    return out


def require_finite_scales(scales: torch.Tensor, name: str) -> None:
    if not all_finite(scales):
        raise CodecError(f"{name} scales hold NaN or infinite values")
    if scales.numel() and bool(scales.min() < 0):
        raise CodecError(f"{name} scales must be non-negative")


def finish(flat: torch.Tensor, header: Header, name: str, *, saturate: bool = False) -> torch.Tensor:
    """The decoded values in the declared shape and dtype, refused if any is NaN or infinite.

    With `saturate`, finite values beyond the declared dtype's range become its largest value
    (for approximations that may overshoot the input's range) rather than infinities.
    """
    if saturate and header.dtype != flat.dtype and torch.finfo(header.dtype).max < torch.finfo(flat.dtype).max:
        if not all_finite(flat):
            raise CodecError(f"{name} parts decode to NaN or infinite values")
        limit = torch.finfo(header.dtype).max
        flat = flat.clamp(-limit, limit)
    out = flat.to(header.dtype).view(header.shape)
    if not all_finite(out):
        raise CodecError(f"{name} parts decode to NaN or infinite values (as {header.dtype})")
    return out
