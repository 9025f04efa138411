"""A model exported by swarmtrain loads in Hugging Face transformers with the same logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configs.loader import load_config
from configs.schema import ModelConfig
from worker.model.export import ExportError, export_hf, hf_config
from worker.model.gptj import GPTJ, init_parameters

transformers = pytest.importorskip("transformers")

SHAPE = ModelConfig(n_layer=2, d_model=48, n_head=3, rotary_dim=8, vocab_size=61, n_ctx=32, d_ff=80,
                    layer_norm_epsilon=1e-6)


def trained_like(cfg: ModelConfig) -> GPTJ:
    model = GPTJ(cfg).eval()
    init_parameters(model, 3, cfg.init_std)
    with torch.no_grad():  # biases and norms off their init, so they are compared too
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_an_exported_model_loads_in_transformers_with_the_same_logits(tmp_path: Path) -> None:
    ours = trained_like(SHAPE)
    out = export_hf(ours, SHAPE, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    hf = transformers.GPTJForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    ids = torch.randint(0, SHAPE.vocab_size, (2, SHAPE.n_ctx), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    assert diff < 1e-4, diff
    assert json.loads((out / "config.json").read_text())["n_inner"] == 80


def test_export_refuses_an_existing_directory_and_leaves_nothing_half_written(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(ExportError, match="exists already"):
        export_hf(trained_like(SHAPE), SHAPE, tmp_path / "taken")
    with pytest.raises(ExportError, match="does not exist"):
        export_hf(trained_like(SHAPE), SHAPE, tmp_path / "missing" / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no staging folder left behind


def test_hf_config_mirrors_the_model_config() -> None:
    tiny = load_config("tiny").model
    config = hf_config(tiny)
    assert (config["n_embd"], config["n_layer"], config["n_head"], config["rotary_dim"], config["n_positions"]) == (
        tiny.d_model, tiny.n_layer, tiny.n_head, tiny.rotary_dim, tiny.n_ctx)


@pytest.mark.multiprocess  # runs `worker --standalone` twice
def test_standalone_training_exports_a_loadable_model(tmp_path: Path) -> None:
    out = tmp_path / "tiny-hf"
    result = subprocess.run([sys.executable, "-m", "worker.app.cli", "--standalone", "--cpu", "--max-steps", "2",
                             "--export", str(out)], capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"exported: {out}" in result.stdout
    hf = transformers.GPTJForCausalLM.from_pretrained(out)
    assert hf.config.n_layer == load_config("tiny").model.n_layer
    again = subprocess.run([sys.executable, "-m", "worker.app.cli", "--standalone", "--export", str(out)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 2 and again.stderr.strip() == f"error: --export {out}: exists already; name a new directory"
