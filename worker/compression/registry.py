"""The codec table: every codec by its name, built from a `CodecChoice` or read back from `meta`.

Apart from base.py so that the codec modules import only the interface, and this module
imports them. At import it checks that every `Codec` of protos/swarmtrain.proto (and so every
name in configs.codecs.CODECS) has an implementation here: an assignment can name no codec a
worker lacks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from configs.codecs import DEFAULT_BLOCK_SIZE, DEFAULT_RANK, DEFAULT_TOPK_FRACTION, CodecChoice
from protos import swarmtrain_pb2 as pb
from worker.compression.base import MAX_NUMEL, Codec, CodecError, Encoded, short_repr
from worker.compression.blockwise import Blockwise4Bit, Blockwise8Bit
from worker.compression.casts import BFloat16, Float16, NoCompression
from worker.compression.powersgd import PowerSGD
from worker.compression.topk import TopK4Bit

# each factory takes every parameter (block_size, topk_fraction, rank, seed) and uses its own
_FACTORIES: dict[str, Callable[..., Codec]] = {
    "none": lambda **_: NoCompression(),
    "float16": lambda **_: Float16(),
    "bfloat16": lambda **_: BFloat16(),
    "blockwise_8bit": lambda block_size, **_: Blockwise8Bit(block_size),
    "blockwise_4bit": lambda block_size, **_: Blockwise4Bit(block_size),
    "topk_4bit": lambda block_size, topk_fraction, seed, **_: TopK4Bit(topk_fraction, block_size=block_size,
                                                                       seed=seed),
    "powersgd": lambda rank, seed, **_: PowerSGD(rank, seed=seed),
}

_PROTO_NAMES = {name.removeprefix("CODEC_").lower() for name in pb.Codec.keys()} - {"unspecified"}
if _PROTO_NAMES != set(_FACTORIES):
    raise ImportError(f"codecs without an implementation: {sorted(_PROTO_NAMES - set(_FACTORIES))}; "
                      f"implemented but not in the proto: {sorted(set(_FACTORIES) - _PROTO_NAMES)}")


def codec_names() -> tuple[str, ...]:
    return tuple(_FACTORIES)


def get_codec(
    name: str, *, block_size: int = DEFAULT_BLOCK_SIZE, topk_fraction: float = DEFAULT_TOPK_FRACTION,
    rank: int = DEFAULT_RANK, seed: int = 0,
) -> Codec:
    """A fresh codec by its name in configs.codecs.CODECS; parameters a codec does not use are ignored.

    Codecs with state (top-k's call counter, PowerSGD's warm-started factors) serve one tensor
    stream each: make one per stream.
    """
    if not isinstance(name, str) or name not in _FACTORIES:
        raise CodecError(f"unknown codec {name!r}; valid: {', '.join(_FACTORIES)}")
    return _FACTORIES[name](block_size=block_size, topk_fraction=topk_fraction, rank=rank, seed=seed)


def codec_for(choice: CodecChoice, *, seed: int = 0) -> Codec:
    """A fresh codec for `choice` (one per tensor stream, as for `get_codec`)."""
    return get_codec(choice.name, block_size=choice.block_size, topk_fraction=choice.topk_fraction,
                     rank=choice.rank, seed=seed)


def decode_any(
    encoded: Encoded, *, device: torch.device | str | None = None, max_numel: int = MAX_NUMEL
) -> torch.Tensor:
    """Decode with the codec and parameters `encoded.meta` names, refusing anything inconsistent.

    Returns the declared shape and dtype on `device` (CPU by default). `max_numel` lowers the
    cap on the declared number of elements.
    """
    if not isinstance(encoded, Encoded):
        raise CodecError(f"expected an Encoded, got {type(encoded).__name__}")
    meta = encoded.meta
    if not isinstance(meta, dict):
        raise CodecError(f"meta must be a dict, got {type(meta).__name__}")
    name = meta.get("codec")
    if not isinstance(name, str) or name not in _FACTORIES:
        raise CodecError(f"unknown codec {short_repr(name)}; valid: {', '.join(_FACTORIES)}")
    # a receiver's codec is stateless for decoding: every parameter comes from meta
    codec = get_codec(name, rank=1)
    return codec.decode(encoded, device=device, max_numel=max_numel)
