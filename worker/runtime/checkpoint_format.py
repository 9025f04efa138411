"""A stage's part of a swarm checkpoint: what is saved, how it is packed, how a stage resumes from it.

One safetensors file per stage, tensors under global parameter names (worker/model/gptj.py):
`param/<name>` the parameters, `adam/<name>/{step,exp_avg,exp_avg_sq}` the inner optimizer's
state, `anchor/<name>` the averaging anchor (worker/replicas/diloco.py) and, where the replica
has led rounds, `momentum/<name>` the outer momentum. The metadata says which checkpoint and
layers the file is for, the stage's optimizer step and averaging round and, on stage 0, its data
position. Because names are global, a stage of a new plan reads its layers from whichever files
hold them, even when the boundaries moved.

The coordinator stores the files (coordinator/storage/checkpoints.py); `CheckpointLink` is how a
runtime reaches it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from protos import swarmtrain_pb2 as pb
from worker.replicas.diloco import ReplicaSync

FORMAT = "swarmtrain-checkpoint/1"
ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")
HASH_BLOCK_BYTES = 8 * 2**20


class CheckpointMismatch(Exception):
    """A checkpoint that cannot be this stage's state (another model, missing layers)."""


@dataclass(frozen=True)
class DataPosition:
    """Microbatches stage 0 had trained of data shard `shard_index` of `shard_count`."""

    shard_index: int
    shard_count: int
    microbatches: int

    def start_for(self, shard_count: int) -> int:
        """Where a shard of a `shard_count`-way split resumes: the same share of an epoch."""
        return self.microbatches * self.shard_count // max(1, shard_count)


@dataclass(frozen=True)
class Resumed:
    checkpoint_id: int
    step: int
    round: int
    data: DataPosition | None
    files: int


@dataclass(frozen=True)
class CheckpointLink:
    """The coordinator's checkpoint RPCs as a runtime needs them.

    `upload(header, data)` sends one stage file (the header's identity fields are filled in) and
    says whether the checkpoint is complete; `download(start, end, folder)` writes the newest
    complete checkpoint's files holding those layers into `folder` and returns them, [] when
    there is none."""

    upload: Callable[[pb.CheckpointFile, bytes], Awaitable[bool]]
    download: Callable[[int, int, Path], Awaitable[list[tuple[pb.CheckpointFile, Path]]]]


# ---- saving --------------------------------------------------------------------------------


def snapshot(stage: torch.nn.Module, optimizer: torch.optim.Optimizer, sync: ReplicaSync) -> dict[str, torch.Tensor]:
    """CPU copies of everything a stage's part holds. Call between two optimizer steps (under
    the stage's lock); packing happens afterwards, off the lock."""
    tensors: dict[str, torch.Tensor] = {}
    momentum = sync.momentum
    for i, (name, p) in enumerate(stage.named_parameters()):
        tensors[f"param/{name}"] = p.detach().to("cpu", torch.float32, copy=True)
        tensors[f"anchor/{name}"] = sync.anchor[i].clone()
        if momentum is not None:
            tensors[f"momentum/{name}"] = momentum[i].clone()
        state = optimizer.state.get(p, {})
        if all(k in state for k in ADAM_KEYS):
            for k in ADAM_KEYS:
                tensors[f"adam/{name}/{k}"] = torch.as_tensor(state[k]).detach().to("cpu", torch.float32, copy=True)
    return tensors


def pack(tensors: dict[str, torch.Tensor], request: pb.CheckpointRequest, step: int, round_number: int,
         data: DataPosition | None) -> tuple[pb.CheckpointFile, bytes]:
    """The stage file's bytes and the header that announces them."""
    meta = {"format": FORMAT, "checkpoint_id": str(request.checkpoint_id), "stage_index": str(request.stage_index),
            "layer_start": str(request.layer_start), "layer_end": str(request.layer_end), "step": str(step),
            "round": str(round_number)}
    if data is not None:
        meta["data"] = json.dumps({"shard_index": data.shard_index, "shard_count": data.shard_count,
                                   "microbatches": data.microbatches})
    blob = save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)
    header = pb.CheckpointFile(checkpoint_id=request.checkpoint_id, stage_index=request.stage_index,
                               layer_start=request.layer_start, layer_end=request.layer_end,
                               size_bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    return header, blob


# ---- resuming ------------------------------------------------------------------------------


def metadata_of(blob: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header (the file's first bytes will do)."""
    if len(blob) < 8:
        raise CheckpointMismatch("a stage file shorter than its header")
    (length,) = struct.unpack("<Q", blob[:8])
    try:
        header = json.loads(blob[8 : 8 + length])
    except ValueError:
        raise CheckpointMismatch("a stage file whose header is not JSON") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointMismatch(f"not a {FORMAT} file")
    return meta


def _checked_header(header: pb.CheckpointFile, path: Path) -> bytes:
    """The file's safetensors header, once its sha256 matches the one announced."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK_BYTES):
            digest.update(block)
        if digest.hexdigest() != header.sha256:
            raise CheckpointMismatch(f"stage {header.stage_index}'s file does not match its sha256")
        f.seek(0)
        head = f.read(8)
        return head + f.read(struct.unpack("<Q", head)[0] if len(head) == 8 else 0)


def resume(files: Sequence[tuple[pb.CheckpointFile, Path]], stage: torch.nn.Module,
           optimizer: torch.optim.Optimizer, sync: ReplicaSync) -> Resumed:
    """Load the stage's parameters, optimizer state and anchor from a checkpoint's stage files.

    Tensors are read one at a time from the memory-mapped files, so a resume holds the stage and
    its anchor, never a whole file. The step and averaging round come from the file that holds
    the stage's first layer; a stage starting at layer 0 takes its data position from it too.
    Raises CheckpointMismatch, leaving the stage untouched, when a file does not match its sha256
    or a parameter is missing or has another shape."""
    if not files:
        raise CheckpointMismatch("no files")
    first_meta: dict[str, str] | None = None
    start = getattr(stage, "layer_start", 0)
    with contextlib.ExitStack() as stack:
        where: dict[str, Any] = {}  # tensor name -> the open file that holds it
        for header, path in files:
            meta = metadata_of(_checked_header(header, path))
            handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            where.update(dict.fromkeys(handle.keys(), handle))
            if header.layer_start <= start < header.layer_end:
                first_meta = meta
        if first_meta is None:
            raise CheckpointMismatch(f"no file holds layer {start}")
        named = list(stage.named_parameters())
        for name, p in named:
            key = f"param/{name}"
            shape = tuple(where[key].get_slice(key).get_shape()) if key in where else None
            if shape != tuple(p.shape):
                what = "missing" if shape is None else f"{shape}, not {tuple(p.shape)}"
                raise CheckpointMismatch(f"parameter {name} is {what}: the checkpoint is of another model")

        def tensor(key: str) -> torch.Tensor:
            return where[key].get_tensor(key)

        with torch.no_grad():
            for name, p in named:
                p.copy_(tensor(f"param/{name}"))
                if all(f"adam/{name}/{k}" in where for k in ADAM_KEYS):
                    optimizer.state[p] = {
                        "step": tensor(f"adam/{name}/step").reshape(()).clone(),
                        "exp_avg": tensor(f"adam/{name}/exp_avg").to(p.device, p.dtype),
                        "exp_avg_sq": tensor(f"adam/{name}/exp_avg_sq").to(p.device, p.dtype),
                    }
        # the anchor defaults to the parameters just loaded (checkpoint 0: weights only)
        anchor = [tensor(f"anchor/{name}") if f"anchor/{name}" in where else p.detach() for name, p in named]
        momentum_names = [f"momentum/{name}" for name, _ in named]
        momentum = [tensor(k) for k in momentum_names] if all(k in where for k in momentum_names) else None
        round_number = _int(first_meta, "round")
        sync.reset(anchor, round_number, momentum=momentum)
    data = None
    if start == 0 and "data" in first_meta:
        try:
            raw = json.loads(first_meta["data"])
            data = DataPosition(int(raw["shard_index"]), int(raw["shard_count"]), int(raw["microbatches"]))
        except (ValueError, KeyError, TypeError):
            raise CheckpointMismatch("stage 0's data position is unreadable") from None
    return Resumed(_int(first_meta, "checkpoint_id"), _int(first_meta, "step"), round_number, data, len(files))


def _int(meta: dict[str, str], key: str) -> int:
    value = meta.get(key, "")
    if not value.isdigit():
        raise CheckpointMismatch(f"the stage file records {key}={value!r}")
    return int(value)
