"""The pretrained checkpoint as the swarm's checkpoint 0: each layer served as a checkpoint file.

When `model.pretrained` names a Hugging Face GPT-J directory and no checkpoint of the run is
complete yet, LoadCheckpoint answers with checkpoint 0: weights only (step 0, no optimizer
state, the anchor equal to the weights), one file per layer in the checkpoint format workers
resume from (worker/runtime/checkpoint_format.py), the embedding with layer 0 and the final norm
and head with the last layer. A stage of any span reads the files of its layers, so re-plans to
other boundaries need nothing new.

Each layer is converted once, on first request, into the state directory as fp32 (4 bytes a
parameter: GPT-J 6B's 28 layers take 24 GB there), written tensor by tensor so the coordinator
never holds more than one tensor of it, next to its final name and renamed into place. One
conversion runs at a time; workers asking for the same layer wait for it and share the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
from pathlib import Path

from configs.pretrained import PretrainedCheckpoint, expected_shapes, open_pretrained, read_tensors
from configs.schema import ModelConfig
from coordinator.storage.checkpoints import FORMAT
from protos import swarmtrain_pb2 as pb

CHECKPOINT_ID = 0  # the run's own checkpoints count from 1


class PretrainedSource:
    """Serves the checkpoint a run starts from, layer by layer (blocking I/O: call off the loop)."""

    def __init__(self, model: ModelConfig, state_dir: str | Path) -> None:
        assert model.pretrained is not None
        self.model = model
        self.checkpoint: PretrainedCheckpoint = open_pretrained(model.pretrained, model)  # PretrainedError
        self.cache = Path(state_dir) / "pretrained" / self.checkpoint.fingerprint[:16]
        self._lock = threading.Lock()

    @property
    def fingerprint(self) -> str:
        return self.checkpoint.fingerprint

    def layer_file(self, layer: int) -> tuple[pb.CheckpointFile, Path]:
        """Layer `layer`'s file, converted on first use, and the header that announces it."""
        if not 0 <= layer < self.model.n_layer:
            raise ValueError(f"layer {layer} is not in [0, {self.model.n_layer})")
        path = self.cache / f"layer-{layer:03d}.safetensors"
        sidecar = path.with_suffix(".json")
        with self._lock:
            if not sidecar.is_file():
                self.cache.mkdir(parents=True, exist_ok=True)
                size, sha256 = self._write(layer, path)
                _write_atomically(sidecar, json.dumps({"size_bytes": size, "sha256": sha256}).encode())
            facts = json.loads(sidecar.read_text())
        header = pb.CheckpointFile(checkpoint_id=CHECKPOINT_ID, stage_index=layer, layer_start=layer,
                                   layer_end=layer + 1, size_bytes=int(facts["size_bytes"]),
                                   sha256=str(facts["sha256"]))
        return header, path

    def _write(self, layer: int, path: Path) -> tuple[int, str]:
        """Write a safetensors file by hand, one tensor at a time: the library's writer wants
        every tensor in memory at once."""
        shapes = expected_shapes(self.model, layer, layer + 1)
        entries, offset = {}, 0
        for name, shape in shapes.items():
            size = 4 * math.prod(shape)
            entries[f"param/{name}"] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        entries["__metadata__"] = {"format": FORMAT, "checkpoint_id": str(CHECKPOINT_ID), "stage_index": str(layer),
                                   "layer_start": str(layer), "layer_end": str(layer + 1), "step": "0",
                                   "round": "0", "pretrained": self.checkpoint.fingerprint}
        head = json.dumps(entries, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # tensor data starts 8-byte aligned
        digest = hashlib.sha256()
        staging = path.with_name(f".{path.name}.partial")
        with open(staging, "wb") as f:
            for chunk in (struct.pack("<Q", len(head)), head):
                f.write(chunk)
                digest.update(chunk)
            import torch  # only a run that starts from a checkpoint needs torch here

            for _, tensor in read_tensors(self.checkpoint, shapes, torch.float32):
                data = memoryview(tensor.contiguous().numpy()).cast("B")  # little-endian, as safetensors is
                f.write(data)
                digest.update(data)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(staging, path)
        return size, digest.hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    staging = path.with_name(f".{path.name}.partial")
    with open(staging, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, path)
