"""Starting from a pretrained Hugging Face GPT-J checkpoint: every layout transformers and
EleutherAI ship, read a stage at a time, checked with one clear line for every user mistake."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configs.pretrained import PretrainedError, expected_shapes, model_section, open_pretrained, read_tensors
from configs.schema import ModelConfig
from worker.model.export import export_hf
from worker.model.gptj import GPTJ
from worker.model.pretrained import load_pretrained
from worker.model.stage import StageModule

transformers = pytest.importorskip("transformers")

# odd sizes everywhere, so a transposed or misplaced tensor cannot pass for the right one
SHAPE = ModelConfig(n_layer=3, d_model=48, n_head=3, rotary_dim=8, vocab_size=61, n_ctx=32, d_ff=80,
                    layer_norm_epsilon=1e-6)


def hf_model(model: ModelConfig = SHAPE) -> transformers.GPTJForCausalLM:
    config = transformers.GPTJConfig(vocab_size=model.vocab_size, n_positions=model.n_ctx, n_embd=model.d_model,
                                     n_layer=model.n_layer, n_head=model.n_head, rotary_dim=model.rotary_dim,
                                     n_inner=model.d_ff, layer_norm_epsilon=model.layer_norm_epsilon,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    hf = transformers.GPTJForCausalLM(config).eval()
    with torch.no_grad():  # biases and norms off their init, so they are checked too
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return hf


def save_bin(hf: transformers.GPTJForCausalLM, out: Path, *, shards: int = 1, dtype: torch.dtype = torch.float32) -> Path:
    """The .bin layouts EleutherAI's repository ships (transformers writes only safetensors now),
    with the causal-mask buffers old checkpoints carry."""
    out.mkdir()
    hf.config.to_json_file(out / "config.json")
    state = {name: t.to(dtype) for name, t in hf.state_dict().items()}
    for i in range(hf.config.n_layer):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(8, 8, dtype=torch.bool))[None, None]
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e9)
    if shards == 1:
        torch.save(state, out / "pytorch_model.bin")
        return out
    names = sorted(state)
    weight_map = {}
    for k in range(shards):
        file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[k::shards]}
        torch.save(part, out / file)
        weight_map.update(dict.fromkeys(part, file))
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def logits(hf: transformers.GPTJForCausalLM) -> torch.Tensor:
    ids = torch.randint(0, SHAPE.vocab_size, (2, SHAPE.n_ctx), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return hf(ids).logits


def with_pretrained(model: ModelConfig, directory: Path) -> ModelConfig:
    return model.model_copy(update={"pretrained": str(directory)})


@pytest.fixture(scope="module")
def original() -> transformers.GPTJForCausalLM:
    return hf_model()


@pytest.fixture(scope="module")
def layouts(original, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    original.save_pretrained(root / "safetensors")
    original.save_pretrained(root / "sharded-safetensors", max_shard_size="40KB")
    return {"safetensors": root / "safetensors", "sharded-safetensors": root / "sharded-safetensors",
            "bin": save_bin(original, root / "bin"), "sharded-bin": save_bin(original, root / "sharded-bin", shards=3)}


@pytest.mark.parametrize("layout", ["safetensors", "sharded-safetensors", "bin", "sharded-bin"])
def test_import_then_export_gives_transformers_the_same_logits(layout, layouts, original, tmp_path: Path) -> None:
    source = layouts[layout]
    if layout.startswith("sharded"):
        assert len({p.suffix for p in source.iterdir()} & {".bin", ".safetensors"}) == 1
        assert any(p.name.endswith(".index.json") for p in source.iterdir())
    checkpoint = open_pretrained(source, SHAPE)
    assert not [n for n in checkpoint.files if n.endswith((".attn.bias", ".attn.masked_bias"))]
    model = GPTJ(SHAPE).eval()
    read = load_pretrained(model, checkpoint)
    assert read == sum(p.numel() * 4 for p in model.parameters())
    out = export_hf(model, SHAPE, tmp_path / "export")
    again = transformers.GPTJForCausalLM.from_pretrained(out).eval()
    assert (logits(again) - logits(original)).abs().max().item() <= 1e-5


def test_a_stage_reads_only_its_own_tensors(layouts, original) -> None:
    checkpoint = open_pretrained(layouts["sharded-bin"], SHAPE)
    stage = StageModule(SHAPE, 1, 3)  # a middle-to-last span: no embedding, the head
    read = load_pretrained(stage, checkpoint)
    theirs = original.state_dict()
    names = [name for name, _ in stage.named_parameters()]
    assert "transformer.wte.weight" not in names and "lm_head.bias" in names
    assert read == sum(theirs[n].numel() * 4 for n in names)
    for name, p in stage.named_parameters():
        assert torch.equal(p.detach(), theirs[name]), name


def test_an_fp16_checkpoint_is_converted_tensor_by_tensor(original, tmp_path: Path) -> None:
    checkpoint = open_pretrained(save_bin(original, tmp_path / "half", dtype=torch.float16), SHAPE)
    assert set(checkpoint.dtypes.values()) == {"torch.float16"}
    name, tensor = next(read_tensors(checkpoint, ["lm_head.weight"], torch.float32))
    assert tensor.dtype == torch.float32
    assert torch.equal(tensor, original.state_dict()[name].half().float())


def test_the_model_code_holds_exactly_the_checkpoint_names() -> None:
    model = GPTJ(SHAPE)
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == expected_shapes(SHAPE)
    stage = StageModule(SHAPE, 1, 2)
    assert {n: tuple(p.shape) for n, p in stage.named_parameters()} == expected_shapes(SHAPE, 1, 2)


def test_the_model_section_is_read_from_config_json(layouts) -> None:
    section = model_section(json.loads((layouts["bin"] / "config.json").read_text()))
    assert ModelConfig(**section) == SHAPE


def test_the_fingerprint_names_the_files_not_where_they_are(layouts, tmp_path: Path) -> None:
    copy = shutil.copytree(layouts["sharded-bin"], tmp_path / "copy")
    assert open_pretrained(copy).fingerprint == open_pretrained(layouts["sharded-bin"]).fingerprint
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "layer_norm_epsilon": 1e-5}))
    assert open_pretrained(copy).fingerprint != open_pretrained(layouts["sharded-bin"]).fingerprint


# ---- every mistake is one line -------------------------------------------------------------


def one_line_error(directory: Path, model: ModelConfig | None = SHAPE) -> str:
    with pytest.raises(PretrainedError) as caught:
        open_pretrained(directory, model)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_directory_that_is_no_checkpoint(tmp_path: Path) -> None:
    assert "no such directory" in one_line_error(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "not a Hugging Face checkpoint directory" in one_line_error(tmp_path / "empty")


def test_a_checkpoint_of_another_architecture(layouts, tmp_path: Path) -> None:
    other = shutil.copytree(layouts["safetensors"], tmp_path / "gpt2")
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 3}))
    assert "describes a gpt2, not GPT-J" in one_line_error(other)
    (other / "config.json").unlink()
    assert "config.json is missing" in one_line_error(other)


def test_a_model_section_that_differs_names_every_difference(layouts) -> None:
    wrong = SHAPE.model_copy(update={"d_model": 96, "n_layer": 4})
    message = one_line_error(layouts["safetensors"], wrong)
    assert "n_layer 4 vs 3" in message and "d_model 96 vs 48" in message
    assert '"d_model": 48' in message  # and the section that would match


def test_a_missing_shard(layouts, tmp_path: Path) -> None:
    broken = shutil.copytree(layouts["sharded-safetensors"], tmp_path / "broken")
    shard = max(broken.glob("model-*.safetensors"))
    shard.unlink()
    assert f"missing: {shard.name}" in one_line_error(broken)


@pytest.mark.parametrize("layout", ["sharded-safetensors", "bin"])
def test_a_truncated_file(layout, layouts, tmp_path: Path) -> None:
    broken = shutil.copytree(layouts[layout], tmp_path / "broken")
    victim = max((p for p in broken.iterdir() if p.suffix in (".bin", ".safetensors")), key=lambda p: p.stat().st_size)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    message = one_line_error(broken)
    assert victim.name in message and "truncated" in message


def test_a_tensor_of_the_wrong_shape(original, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    original.config.to_json_file(broken / "config.json")
    state = {n: t.contiguous() for n, t in original.state_dict().items()}
    state["transformer.h.1.mlp.fc_in.weight"] = state["transformer.h.1.mlp.fc_in.weight"].t().contiguous()
    save_file(state, str(broken / "model.safetensors"))
    assert "transformer.h.1.mlp.fc_in.weight is [48, 80], not [80, 48]" in one_line_error(broken)


# ---- the command line ----------------------------------------------------------------------


def worker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.app.cli", "--standalone", "--cpu", *args],
                          capture_output=True, text=True, timeout=240, check=False)


@pytest.mark.multiprocess  # runs `worker --standalone` twice
def test_standalone_round_trip_and_a_mismatch_on_the_command_line(tmp_path: Path) -> None:
    from configs.loader import load_config

    tiny = load_config("tiny").model
    hf = hf_model(tiny)
    hf.save_pretrained(tmp_path / "pretrained", max_shard_size="200KB")
    out = tmp_path / "export"
    done = worker("--set", f"model.pretrained={tmp_path / 'pretrained'}", "--max-steps", "0", "--export", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"weights: {tmp_path / 'pretrained'}" in done.stdout
    again = transformers.GPTJForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, tiny.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (again(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5
    wrong = worker("--set", f"model.pretrained={tmp_path / 'pretrained'}", "--set", "model.d_model=64",
                   "--set", "model.n_head=2", "--max-steps", "0")
    assert wrong.returncode == 2
    assert wrong.stderr.strip().startswith("config error: model.pretrained ")
    assert "d_model 64 vs 128; n_head 2 vs 4" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1


@pytest.mark.multiprocess  # runs `coordinator --check`
def test_a_coordinator_refuses_a_checkpoint_that_is_not_the_model(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    done = subprocess.run([sys.executable, "-m", "coordinator.app.cli", "--config", "tiny", "--check",
                           "--set", f"model.pretrained={tmp_path / 'empty'}"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"config error: model.pretrained {tmp_path / 'empty'}: holds none of "
                                   "model.safetensors.index.json, model.safetensors, pytorch_model.bin.index.json, "
                                   "pytorch_model.bin: not a Hugging Face checkpoint directory")
