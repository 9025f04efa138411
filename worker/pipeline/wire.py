"""Tensors on the pipeline wire: codecs, strict decoding, and chunked protobuf frames.

Every call is one libp2p stream: the caller sends `runtime_pb2.ExpertRequest` frames and
the stage answers with `runtime_pb2.ExpertResponse` frames. These are hivemind's own
messages, so no second protobuf toolchain is needed: `uid` carries the stage key, `tensors`
the tensor parts, `metadata` a small JSON object (codec, dropout seed, loss, errors).

Streams rather than unary calls for every size: on loopback a stream round trip measured
1.2 ms for 64 KB and ~400 MB/s for 12 MB, against 7 ms and ~100 MB/s for unary calls,
and streams have no 4 MiB message cap. Each tensor is cut into parts of at most
`WIRE_CHUNK_BYTES` (hivemind's `split_for_streaming`), and parts are packed into frames of
about that size, so no frame comes near the daemon's 4 MiB limit whatever the tensor.

Decoding trusts nothing: compression type, dtype, shape and buffer length are checked
against each other before a byte is interpreted, the total size is capped while frames
arrive, and float tensors must be finite. Encoding and decoding run in worker threads
(`encode_frames`, `read_frames`): a 32 MiB activation takes tens of milliseconds to copy,
time in which the event loop keeps moving other microbatches' bytes.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

from configs.codecs import ACTIVATION_CODECS, CODECS, DEFAULT_BLOCK_SIZE, CodecChoice, unknown_codec
from worker.compression import CodecError, Encoded, codec_for, decode_any
from worker.pipeline.errors import WireError

NONE = runtime_pb2.CompressionType.NONE
FLOAT16 = runtime_pb2.CompressionType.FLOAT16
MEANSTD_16BIT = runtime_pb2.CompressionType.MEANSTD_16BIT

# 256 KiB - 1 MiB parts measured fastest on loopback (64 KiB parts: 2.5x slower per byte)
WIRE_CHUNK_BYTES = 512 * 1024
MAX_METADATA_BYTES = 64 * 1024
MAX_DIMS = 4

Role = Literal["activation", "gradient", "raw"]  # raw: a codec's parts, sent exactly as they are

# What each codec puts on the wire. A caller names it (its parameters take CodecChoice's defaults)
# or gives a configs.codecs.CodecChoice. "none" and "float16" are hivemind's own; "bfloat16" and
# the blockwise codecs are worker.compression's, with the choice's block size, sent as raw parts
# with their layout in the metadata (`_with_codec`). Only ACTIVATION_CODECS travel here: top-k and
# low-rank codecs are for averaged pseudo-gradients (an activation or its gradient with 99% of its
# values dropped is useless), and the config refuses them in the activation ladder.
WireCodec = CodecChoice | str
MAX_BLOCK_SIZE = 1 << 16  # a request may ask for blocks up to this many values
_ACTIVATION_COMPRESSION = {codec: FLOAT16 for codec in ACTIVATION_CODECS} | {"none": NONE}
_WIRE_CODECS = frozenset({"bfloat16", "blockwise_8bit", "blockwise_4bit"})
# Gradients take fp16 with a per-row mean and scale (MEANSTD_16BIT, 8 extra bytes per row):
# a gradient averaged over thousands of tokens and scaled by 1/microbatches is ~1e-6 per
# element, where plain fp16 is subnormal and keeps a few bits, or flushes to zero.
_GRADIENT_COMPRESSION = {codec: MEANSTD_16BIT for codec in ACTIVATION_CODECS} | {"none": NONE}

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "uint8": 1}
# (compression, declared dtype) pairs a receiver accepts; everything else is refused
_RECEIVABLE = {
    NONE: {"float32", "float16", "bfloat16", "int64", "int32", "int16", "uint8"},
    FLOAT16: {"float32"},
    MEANSTD_16BIT: {"float32"},
}


def narrow_ids(ids: torch.Tensor) -> torch.Tensor:
    """Token ids or targets in the smallest integer type that holds them: int16 for vocabularies
    below 32,768 (and the -100 of ignored targets), else int32: 2 bytes a token on the wire
    instead of 8, next to the d_model / 2 bytes a token of 4-bit activations."""
    if ids.numel() and int(ids.min()) >= -(2**15) and int(ids.max()) < 2**15:
        return ids.to(torch.int16)
    return ids.to(torch.int32) if ids.dtype == torch.int64 else ids


def handler_name(key: str, method: str) -> str:
    """The libp2p protocol name of `method` ("forward", ...) on the stage served under `key`."""
    return f"swarmtrain.pipeline.{key}.{method}"


def check_codec(codec: WireCodec) -> WireCodec:
    """`codec`, if it names a codec the pipeline carries; else ValueError (one line)."""
    name = codec.name if isinstance(codec, CodecChoice) else codec
    if name in _ACTIVATION_COMPRESSION:
        return codec
    if name in CODECS:
        raise ValueError(f"{name} cannot carry activations; valid: {', '.join(ACTIVATION_CODECS)}")
    raise ValueError(unknown_codec(name))


def codec_meta(codec: WireCodec) -> dict[str, Any]:
    """A request's metadata naming `codec`: its name, and the block size where it is not the
    default (the answer is encoded the same way, so the called stage must know it)."""
    choice = wire_choice(codec)
    return {"codec": choice.name} | ({"block_size": choice.block_size}
                                     if choice.block_size != DEFAULT_BLOCK_SIZE else {})


def codec_from_meta(meta: dict[str, Any]) -> CodecChoice:
    """The codec a request's metadata names (`codec_meta`), checked; ValueError or TypeError if not."""
    name, block = meta.get("codec", "none"), meta.get("block_size", DEFAULT_BLOCK_SIZE)
    check_codec(name)
    if type(block) is not int or not 0 < block <= MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be an integer in [1, {MAX_BLOCK_SIZE}] (got {str(block)[:40]})")
    return CodecChoice(name, block_size=block)


def wire_choice(codec: WireCodec) -> CodecChoice:
    """The CodecChoice `codec` stands for (a name: with the default parameters), checked."""
    check_codec(codec)
    return codec if isinstance(codec, CodecChoice) else CodecChoice(codec)


def compression_for(tensor: torch.Tensor, codec: WireCodec, role: Role) -> int:
    """The hivemind CompressionType `codec` uses for `tensor` in `role`."""
    name = wire_choice(codec).name
    if role == "raw" or not tensor.is_floating_point() or tensor.numel() == 0 or tensor.dim() == 0:
        return NONE  # ids, targets and codec parts travel exact; empty or scalar tensors have nothing to save
    table = _GRADIENT_COMPRESSION if role == "gradient" else _ACTIVATION_COMPRESSION
    return table[name]


def encode_tensor(tensor: torch.Tensor, codec: WireCodec, role: Role = "activation") -> runtime_pb2.Tensor:
    """Serialize a CPU copy of `tensor` (detached: gradients never cross the wire as graph).

    Non-finite values are refused here as well as on receipt: float16 would clamp an
    infinity to 65504 and deliver a finite, wrong number.
    """
    tensor = tensor.detach().to("cpu")
    if tensor.dim() > MAX_DIMS:
        raise WireError(f"tensors of at most {MAX_DIMS} dims go on the wire (got {tuple(tensor.shape)})")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise WireError(f"tensor {tuple(tensor.shape)} holds NaN or infinite values; refusing to send it")
    if tensor.is_floating_point() and tensor.dtype != torch.float32 and tensor.numel() and role != "raw":
        tensor = tensor.float()  # one float dtype on the wire keeps the receiver's checks simple
    if tensor.dtype == torch.bfloat16:  # 2 bytes each; hivemind's NONE would widen them to fp32
        return runtime_pb2.Tensor(compression=NONE, buffer=tensor.contiguous().view(torch.int16).numpy().tobytes(),
                                  size=tensor.shape, dtype="bfloat16")
    return serialize_torch_tensor(tensor, compression_for(tensor, codec, role))


def decode_tensor(message: runtime_pb2.Tensor, *, finite: bool = True) -> torch.Tensor:
    """Deserialize one complete tensor, refusing anything inconsistent or non-finite."""
    dtype = message.dtype
    if message.compression not in _RECEIVABLE:
        raise WireError(f"unsupported compression {message.compression}")
    if dtype not in _RECEIVABLE[message.compression]:
        name = runtime_pb2.CompressionType.Name(message.compression)
        raise WireError(f"dtype {dtype!r} is not accepted with compression {name}")
    shape = tuple(message.size)
    if len(shape) > MAX_DIMS:
        raise WireError(f"a tensor of {len(shape)} dims (at most {MAX_DIMS})")
    numel = math.prod(shape)
    if message.compression != NONE and (numel == 0 or not shape):
        raise WireError("empty and scalar tensors must be sent uncompressed")
    expected = _expected_bytes(message.compression, dtype, shape, numel)
    if len(message.buffer) != expected:
        raise WireError(f"tensor {shape} {dtype} needs {expected} bytes, got {len(message.buffer)}")
    try:
        tensor = deserialize_torch_tensor(message).detach()
    except (ValueError, TypeError, RuntimeError, IndexError) as err:
        raise WireError(f"cannot decode tensor {shape} {dtype}: {err}") from None
    if finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise WireError(f"tensor {shape} holds NaN or infinite values")
    return tensor


def _expected_bytes(compression: int, dtype: str, shape: tuple[int, ...], numel: int) -> int:
    if compression == NONE:
        return numel * _ITEMSIZE[dtype]
    if compression == FLOAT16:
        return numel * 2
    rows = numel // shape[-1] if shape and shape[-1] else 0
    return numel * 2 + rows * 8  # fp16 values, then an fp32 mean and scale per row


# ----------------------------------------------------------------------------- frames


@dataclass
class Payload:
    """What one request or response carries: tensors, their wire roles, and JSON metadata."""

    tensors: list[torch.Tensor] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    roles: list[Role] | None = None  # per tensor; None = all activations

    def role(self, i: int) -> Role:
        return self.roles[i] if self.roles is not None else "activation"


TENSOR_COUNT = "tensor_count"  # metadata key of the number of tensors a message carries
Frame = TypeVar("Frame", runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse)


def request_frames(
    key: str, payload: Payload, codec: WireCodec, chunk_bytes: int = WIRE_CHUNK_BYTES
) -> Iterator[runtime_pb2.ExpertRequest]:
    return _frames(runtime_pb2.ExpertRequest, payload, codec, chunk_bytes, uid=key)


def response_frames(
    payload: Payload, codec: WireCodec, chunk_bytes: int = WIRE_CHUNK_BYTES
) -> Iterator[runtime_pb2.ExpertResponse]:
    return _frames(runtime_pb2.ExpertResponse, payload, codec, chunk_bytes)


def _frames(
    cls: type[Frame], payload: Payload, codec: WireCodec, chunk_bytes: int, **first: Any
) -> Iterator[Frame]:
    """Frames of about `chunk_bytes`: the first holds the metadata, then tensor parts in order."""
    choice = wire_choice(codec)
    payload = _with_codec(payload, choice)
    # how many tensors follow: a stream cut at a frame boundary ends like a whole message
    # (hivemind's stream client takes a closed connection for the end), this tells them apart
    metadata = json.dumps({**payload.meta, TENSOR_COUNT: len(payload.tensors)}, separators=(",", ":")).encode()
    if len(metadata) > MAX_METADATA_BYTES:
        raise WireError(f"metadata of {len(metadata)} bytes (at most {MAX_METADATA_BYTES})")
    header: dict[str, Any] = {"metadata": metadata, **first}  # only the first frame carries it
    parts: list[runtime_pb2.Tensor] = []
    size = 0
    for i, tensor in enumerate(payload.tensors):
        for part in split_for_streaming(encode_tensor(tensor, choice, payload.role(i)), chunk_bytes):
            if parts and size + len(part.buffer) > chunk_bytes:
                yield cls(tensors=parts, **header)
                header, parts, size = {}, [], 0
            parts.append(part)
            size += len(part.buffer)
    yield cls(tensors=parts, **header)


def _with_codec(payload: Payload, choice: CodecChoice) -> Payload:
    """The payload with its activations and gradients encoded by worker.compression where `choice`
    is one of its codecs: their parts travel raw and `meta["layout"]` says how to rebuild them."""
    if choice.name not in _WIRE_CODECS:
        return payload
    try:
        codec = codec_for(choice)  # the wire's codecs keep no state between tensors
    except CodecError as err:
        raise WireError(f"cannot encode with {choice.name}: {err}") from None
    tensors: list[torch.Tensor] = []
    roles: list[Role] = []
    layout: list[dict[str, Any] | None] = []
    for i, tensor in enumerate(payload.tensors):
        role = payload.role(i)
        if role == "raw" or not tensor.is_floating_point() or tensor.numel() == 0 or tensor.dim() == 0:
            tensors.append(tensor)
            roles.append(role)
            layout.append(None)
            continue
        try:
            encoded = codec.encode(tensor.detach().to("cpu"))
        except CodecError as err:
            message = f"cannot encode a {tuple(tensor.shape)} tensor with {choice.name}: {err}"
            raise WireError(message) from None
        tensors.extend(encoded.parts)
        roles.extend(["raw"] * len(encoded.parts))
        layout.append({"meta": encoded.meta, "parts": len(encoded.parts)})
    return Payload(tensors, {**payload.meta, "layout": layout}, roles)


def _rebuild(tensors: list[torch.Tensor], meta: dict[str, Any]) -> list[torch.Tensor]:
    """Undo `_with_codec` on received tensors, trusting nothing in the layout."""
    layout = meta.pop("layout", None)
    if layout is None:
        return tensors
    if not isinstance(layout, list) or len(layout) > len(tensors):
        raise WireError("the tensor layout does not match the tensors sent")
    out, at = [], 0
    for entry in layout:
        if entry is None:
            if at >= len(tensors):
                raise WireError("the tensor layout does not match the tensors sent")
            out.append(tensors[at])
            at += 1
            continue
        n = entry.get("parts") if isinstance(entry, dict) else None
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 8 or at + n > len(tensors):
            raise WireError("the tensor layout does not match the tensors sent")
        try:
            out.append(decode_any(Encoded(tensors[at:at + n], entry.get("meta"))))
        except CodecError as err:
            raise WireError(f"cannot decode a compressed tensor: {err}") from None
        at += n
    if at != len(tensors):
        raise WireError("the tensor layout does not match the tensors sent")
    return out


async def encode_frames(frames: Iterator[Frame]) -> list[Frame]:
    """Build all frames of a message in a worker thread (see the module notes)."""
    return await asyncio.to_thread(list, frames)


@dataclass
class Received:
    """A decoded request or response: the stage key (requests only), payload and wire size."""

    key: str
    payload: Payload
    wire_bytes: int


async def read_frames(
    frames: AsyncIterable[Frame], *, max_bytes: int, finite: bool = True
) -> Received | None:
    """Reassemble the frames of one message; None when the stream ends before any frame.

    A tensor starts at a part with a dtype (as `split_for_streaming` makes them) and must
    arrive in exactly the number of parts its first part announces.
    """
    key: str | None = None
    metadata = b""
    groups: list[list[runtime_pb2.Tensor]] = []
    wire_bytes = 0
    async for frame in frames:
        wire_bytes += frame.ByteSize()
        if wire_bytes > max_bytes:  # checked per frame: stop reading before buffering more
            raise WireError(f"message exceeds the limit of {max_bytes:,} bytes")
        if key is None:
            key, metadata = getattr(frame, "uid", ""), frame.metadata
        for part in frame.tensors:
            if part.dtype:
                groups.append([part])
            elif groups:
                groups[-1].append(part)
            else:
                raise WireError("a tensor continuation part arrived before any tensor start")
    if key is None:
        return None
    meta = _parse_meta(metadata)
    count = meta.pop(TENSOR_COUNT, None)
    if count is not None and count != len(groups):
        raise WireError(f"the message was cut short: {len(groups)} of {count} tensors arrived")
    tensors = await asyncio.to_thread(lambda: _rebuild(_decode_groups(groups, finite), meta))
    return Received(key=key, payload=Payload(tensors=tensors, meta=meta), wire_bytes=wire_bytes)


def _decode_groups(groups: list[list[runtime_pb2.Tensor]], finite: bool) -> list[torch.Tensor]:
    tensors = []
    for group in groups:
        if len(group) != max(group[0].chunks, 1):
            raise WireError(f"a tensor announced {group[0].chunks} parts and arrived in {len(group)}")
        tensors.append(decode_tensor(combine_from_streaming(group), finite=finite))
    return tensors


def _parse_meta(raw: bytes) -> dict[str, Any]:
    if not raw:
        return {}
    if len(raw) > MAX_METADATA_BYTES:
        raise WireError(f"metadata of {len(raw)} bytes (at most {MAX_METADATA_BYTES})")
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise WireError("metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise WireError("metadata must be a JSON object")
    return meta
