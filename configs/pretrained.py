"""The pretrained Hugging Face GPT-J checkpoint a run starts from (`model.pretrained: DIR`).

A directory in Hugging Face layout: `config.json` plus one of `model.safetensors`, a sharded
`model.safetensors.index.json`, `pytorch_model.bin` or a sharded `pytorch_model.bin.index.json`
(EleutherAI's gpt-j-6b ships only the .bin forms: 24.2 GB fp32 on `main`, 12.1 GB fp16 on
`float16`). `open_pretrained` checks the layout, every shard's completeness and every tensor's
shape against the run's model section without reading tensor data; `read_tensors` then reads
the tensors a caller names, one at a time and memory-mapped (safetensors `safe_open`,
`torch.load(mmap=True)` for .bin), so a worker holding four layers never has the other 24 in
memory. Both the coordinator (which serves spans as checkpoint 0) and the worker (a local copy,
or `--standalone`) read through here, so the tensor names and checks are the same for both.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from configs.schema import ModelConfig

__all__ = ["PretrainedCheckpoint", "PretrainedError", "expected_shapes", "model_section", "open_pretrained",
           "read_tensors"]

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
LAYOUTS = (SAFETENSORS_INDEX, SAFETENSORS, BIN_INDEX, BIN)  # the first present wins
# buffers that old GPT-J checkpoints carry beside the parameters: the causal mask, recomputed here
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


class PretrainedError(Exception):
    """A pretrained checkpoint that cannot start this run; the message says why in one line."""


@dataclass(frozen=True)
class PretrainedCheckpoint:
    directory: Path
    layout: str  # one of LAYOUTS
    hf_config: dict[str, Any]
    files: dict[str, str]  # tensor name -> the file (in `directory`) that holds it
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # tensor name -> its dtype in the file ("F16", "torch.float16", ...)
    fingerprint: str  # sha256 of config.json, the index and each file's name and size

    @property
    def size_bytes(self) -> int:
        return sum((self.directory / name).stat().st_size for name in sorted(set(self.files.values())))


# ---- what a GPT-J of a model section holds (pure) ------------------------------------------


def expected_shapes(model: ModelConfig, start: int = 0, end: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every parameter of layers [start, end) under Hugging Face's names, with its shape: the
    embedding with layer 0, the final norm and the head with the last layer."""
    end = model.n_layer if end is None else end
    d, inner, vocab = model.d_model, model.inner_dim, model.vocab_size
    shapes: dict[str, tuple[int, ...]] = {}
    if start == 0:
        shapes["transformer.wte.weight"] = (vocab, d)
    for i in range(start, end):
        h = f"transformer.h.{i}"
        shapes.update({f"{h}.ln_1.weight": (d,), f"{h}.ln_1.bias": (d,),
                       **{f"{h}.attn.{p}_proj.weight": (d, d) for p in ("q", "k", "v", "out")},
                       f"{h}.mlp.fc_in.weight": (inner, d), f"{h}.mlp.fc_in.bias": (inner,),
                       f"{h}.mlp.fc_out.weight": (d, inner), f"{h}.mlp.fc_out.bias": (d,)})
    if end == model.n_layer:
        shapes.update({"transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,),
                       "lm_head.weight": (vocab, d), "lm_head.bias": (vocab,)})
    return shapes


def model_section(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The `model:` section that describes a GPT-J config.json (pure)."""
    d_model, n_head = int(hf_config["n_embd"]), int(hf_config["n_head"])
    rotary = hf_config.get("rotary_dim")
    section = {"n_layer": int(hf_config["n_layer"]), "d_model": d_model, "n_head": n_head,
               "rotary_dim": int(rotary) if rotary is not None else d_model // n_head,
               "vocab_size": int(hf_config["vocab_size"]), "n_ctx": int(hf_config["n_positions"]),
               "d_ff": int(hf_config["n_inner"]) if hf_config.get("n_inner") is not None else 4 * d_model,
               "layer_norm_epsilon": float(hf_config.get("layer_norm_epsilon", 1e-5))}
    return section


def mismatches(model: ModelConfig, hf_config: dict[str, Any]) -> list[str]:
    """Where the run's model section differs from config.json, one phrase each (pure)."""
    theirs = model_section(hf_config)
    ours = {"n_layer": model.n_layer, "d_model": model.d_model, "n_head": model.n_head,
            "rotary_dim": model.rotary_dim, "vocab_size": model.vocab_size, "n_ctx": model.n_ctx,
            "d_ff": model.inner_dim, "layer_norm_epsilon": model.layer_norm_epsilon}
    out = []
    for key, value in ours.items():
        other = theirs[key]
        if key == "n_ctx":
            if value > other:  # no position table: a shorter context reads the same weights
                out.append(f"n_ctx {value} > the checkpoint's n_positions {other}")
        elif key == "layer_norm_epsilon":
            if not math.isclose(value, other, rel_tol=1e-6):
                out.append(f"layer_norm_epsilon {value:g} vs {other:g}")
        elif value != other:
            out.append(f"{key} {value} vs {other}")
    act = hf_config.get("activation_function", "gelu_new")
    if act != "gelu_new":
        out.append(f"activation_function {act!r} (swarmtrain's GPT-J computes 'gelu_new')")
    if hf_config.get("tie_word_embeddings", False):
        out.append("tie_word_embeddings true (GPT-J's head is untied)")
    return out


# ---- opening a directory -------------------------------------------------------------------


def open_pretrained(directory: str | Path, model: ModelConfig | None = None) -> PretrainedCheckpoint:
    """Check a checkpoint directory and index its tensors, reading no tensor data.

    With `model`, also checks config.json against it and that every tensor the model needs is
    present with its shape. Raises PretrainedError with one line naming every problem found."""
    root = Path(directory).expanduser()
    where = f"model.pretrained {directory}"
    if not root.is_dir():
        raise PretrainedError(f"{where}: no such directory")
    layout = next((name for name in LAYOUTS if (root / name).is_file()), None)
    if layout is None:
        raise PretrainedError(f"{where}: holds none of {', '.join(LAYOUTS)}: not a Hugging Face checkpoint directory")
    config_path = root / "config.json"
    try:
        hf_config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise PretrainedError(f"{where}: config.json is missing") from None
    except (OSError, ValueError) as err:
        raise PretrainedError(f"{where}: config.json is unreadable ({err})") from None
    if not isinstance(hf_config, dict) or hf_config.get("model_type") != "gptj":
        kind = hf_config.get("model_type") if isinstance(hf_config, dict) else None
        raise PretrainedError(f"{where}: config.json describes a {kind or 'model without a model_type'}, "
                              "not GPT-J (model_type 'gptj')")
    try:
        model_section(hf_config)
    except (KeyError, TypeError, ValueError) as err:
        raise PretrainedError(f"{where}: config.json lacks or garbles a GPT-J field ({err})") from None
    if model is not None and (diff := mismatches(model, hf_config)):
        raise PretrainedError(f"{where}: the model section differs from its config.json: {'; '.join(diff)} "
                              f"(a matching section: {json.dumps(model_section(hf_config))})")

    digest = hashlib.sha256(config_path.read_bytes())
    if layout.endswith(".index.json"):
        index_bytes = (root / layout).read_bytes()
        digest.update(index_bytes)
        try:
            weight_map = json.loads(index_bytes)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise PretrainedError(f"{where}: {layout} has no readable weight_map") from None
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise PretrainedError(f"{where}: {len(missing)} shard(s) named in {layout} are missing: "
                                  f"{', '.join(missing[:3])}{'…' if len(missing) > 3 else ''}")
    else:
        shards = [layout]
    files: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for shard in shards:
        digest.update(f"{shard}:{(root / shard).stat().st_size}".encode())
        entries = _safetensors_entries(root / shard) if shard.endswith(".safetensors") else _bin_entries(root / shard)
        for name, (shape, dtype) in entries.items():
            if name.endswith(IGNORED_SUFFIXES):
                continue
            files[name], shapes[name], dtypes[name] = shard, shape, dtype
    found = PretrainedCheckpoint(root, layout, hf_config, files, shapes, dtypes, digest.hexdigest())
    if model is not None:
        check_tensors(found, expected_shapes(model))
    return found


def check_tensors(checkpoint: PretrainedCheckpoint, expected: dict[str, tuple[int, ...]]) -> None:
    """Raise PretrainedError unless every expected tensor is there with its shape."""
    missing = [n for n in expected if n not in checkpoint.shapes]
    wrong = [f"{n} is {list(checkpoint.shapes[n])}, not {list(s)}" for n, s in expected.items()
             if n in checkpoint.shapes and checkpoint.shapes[n] != s]
    where = f"model.pretrained {checkpoint.directory}"
    if missing:
        raise PretrainedError(f"{where}: {len(missing)} tensor(s) missing, e.g. {', '.join(missing[:3])}")
    if wrong:
        raise PretrainedError(f"{where}: {len(wrong)} tensor(s) of the wrong shape: {'; '.join(wrong[:3])}")


def _safetensors_entries(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and dtypes from a safetensors header; the file must be as long as it says."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(size - 8, 100 * 2**20):
                raise ValueError("header length beyond the file")
            header = json.loads(f.read(length))
        entries, data_end = {}, 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            entries[name] = (tuple(int(x) for x in info["shape"]), str(info["dtype"]))
            data_end = max(data_end, int(info["data_offsets"][1]))
    except (struct.error, ValueError, KeyError, TypeError, AttributeError):
        raise PretrainedError(f"model.pretrained: {path.name} is not a readable safetensors file") from None
    if size < 8 + length + data_end:
        raise PretrainedError(f"model.pretrained: {path.name} is truncated: {size:,} bytes, its header "
                              f"needs {8 + length + data_end:,} (download it again)")
    return entries


def _bin_entries(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and dtypes of a torch .bin (zip) file, memory-mapped: no tensor data is read."""
    import torch  # only a .bin needs torch to be indexed

    try:
        with zipfile.ZipFile(path):  # reads the central directory at the end: a cut file fails here
            pass
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except zipfile.BadZipFile:
        raise PretrainedError(f"model.pretrained: {path.name} is truncated or not a torch zip file "
                              "(download it again)") from None
    except (RuntimeError, OSError, ValueError, EOFError) as err:
        raise PretrainedError(f"model.pretrained: {path.name} cannot be read as a state dict "
                              f"({str(err).splitlines()[0][:160]})") from None
    if not isinstance(state, dict):
        raise PretrainedError(f"model.pretrained: {path.name} holds a {type(state).__name__}, not a state dict")
    return {name: (tuple(t.shape), str(t.dtype)) for name, t in state.items() if hasattr(t, "shape")}


# ---- reading tensors -----------------------------------------------------------------------


def read_tensors(checkpoint: PretrainedCheckpoint, names: Iterable[str], dtype: Any = None) -> Iterator[tuple[str, Any]]:
    """Yield (name, tensor) for `names`, shard by shard, each converted to `dtype` on its own.

    safetensors shards are opened with `safe_open` and read tensor by tensor; a .bin shard is
    loaded memory-mapped, so only the pages of the tensors taken are read. A tensor that is not
    converted still maps the file: copy it before the shard's file may change."""
    import torch
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name in names:
        if name not in checkpoint.files:
            raise PretrainedError(f"model.pretrained {checkpoint.directory}: tensor {name} is missing")
        by_file.setdefault(checkpoint.files[name], []).append(name)
    for shard, wanted in by_file.items():
        path = checkpoint.directory / shard
        if shard.endswith(".safetensors"):
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in wanted:
                    tensor = f.get_tensor(name)
                    yield name, tensor.to(dtype) if dtype is not None else tensor
        else:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            for name in wanted:
                tensor = state[name]
                yield name, tensor.to(dtype) if dtype is not None else tensor
            del state
