"""Write a model as a Hugging Face GPT-J directory: config.json + model.safetensors.

Parameter names are already Hugging Face's (worker/model/gptj.py), so the state dict is written as
it is; `transformers.GPTJForCausalLM.from_pretrained(directory)` loads it and computes the
same logits (tests/unit/test_export.py). The directory appears whole or not at all: it is
written next to its final name, fsynced, then renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from configs.schema import ModelConfig
from configs.version import SOFTWARE_VERSION


class ExportError(Exception):
    """The export cannot be written where asked; the message says why in one line."""


def hf_config(model: ModelConfig) -> dict[str, object]:
    """GPTJConfig's fields for `model` (pure); dropout off, untied head, as swarmtrain trains it."""
    return {
        "architectures": ["GPTJForCausalLM"],
        "model_type": "gptj",
        "vocab_size": model.vocab_size,
        "n_positions": model.n_ctx,
        "n_embd": model.d_model,
        "n_layer": model.n_layer,
        "n_head": model.n_head,
        "rotary_dim": model.rotary_dim,
        "n_inner": model.d_ff,
        "activation_function": "gelu_new",
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": model.layer_norm_epsilon,
        "initializer_range": model.init_std,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "float32",
        "swarmtrain_version": SOFTWARE_VERSION,
    }


def export_hf(model: torch.nn.Module, config: ModelConfig, out: Path) -> Path:
    """Write `model` (a full GPTJ) to the new directory `out`; refuses to overwrite anything."""
    out = Path(out)
    if out.exists():
        raise ExportError(f"{out} exists already: name a new directory (nothing is overwritten)")
    if not out.parent.is_dir():
        raise ExportError(f"folder {out.parent} does not exist")
    tensors = {name: p.detach().to("cpu", torch.float32).contiguous() for name, p in model.state_dict().items()}
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(hf_config(config), indent=2) + "\n")
        for name in ("model.safetensors", "config.json"):
            with open(staging / name, "rb") as f:
                os.fsync(f.fileno())
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
