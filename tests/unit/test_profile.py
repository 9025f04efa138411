"""Per-layer cost profile: GPT-J 6B's published numbers, and exact agreement with the real module."""

from __future__ import annotations

import random

import pytest
import torch

from configs.loader import load_config
from configs.profile import (
    block_params,
    embedding_params,
    head_params,
    model_profile,
    total_params,
    train_memory_breakdown,
    train_memory_bytes,
)
from configs.schema import ModelConfig
from worker.model.gptj import GPTJ
from worker.model.stage import split_layers


@pytest.fixture(scope="module")
def gptj6b() -> ModelConfig:
    return load_config("gptj-6b").model


def test_gptj_6b_parameter_count(gptj6b) -> None:
    # block: ln_1 2*4096 + q,k,v,out 4*4096^2 + fc_in/fc_out 2*4096*16384 + biases 16384 + 4096
    assert block_params(gptj6b) == 8_192 + 67_108_864 + 134_217_728 + 16_384 + 4_096 == 201_355_264
    assert embedding_params(gptj6b) == 50_400 * 4_096 == 206_438_400
    assert head_params(gptj6b) == 8_192 + 206_438_400 + 50_400 == 206_496_992
    assert total_params(gptj6b) == 28 * 201_355_264 + 206_438_400 + 206_496_992 == 6_050_882_784
    assert abs(total_params(gptj6b) / 6.05e9 - 1) < 0.005


def test_gptj_6b_module_has_that_many_parameters(gptj6b) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init
        model = GPTJ(gptj6b)
    assert sum(p.numel() for p in model.parameters()) == total_params(gptj6b)


def test_gptj_6b_costs(gptj6b) -> None:
    prof = model_profile(gptj6b, "bf16")
    assert len(prof.blocks) == 28
    assert abs(prof.total.train_flops_per_token / 3.63e10 - 1) < 0.01
    assert prof.total.inference_flops_per_token == 2 * 6_050_882_784
    block = prof.blocks[0]
    assert abs(block.params / 201e6 - 1) < 0.01
    assert block.train_memory_bytes == 16 * 201_355_264  # ~3.2 GB
    assert abs(block.train_memory_bytes / 3.2e9 - 1) < 0.01
    # the boundary's residual crosses as fp32 at every precision (configs.profile.WIRE_BYTES_PER_ELEMENT)
    assert block.activation_bytes_per_token == 16384
    assert model_profile(gptj6b, "fp32").blocks[0].activation_bytes_per_token == 16384


def test_train_memory_breakdown() -> None:
    fp32 = train_memory_breakdown(1000, "fp32")
    assert (fp32.weights, fp32.gradients, fp32.master_weights, fp32.optimizer) == (4000, 4000, 0, 8000)
    for precision in ("bf16", "fp16"):
        half = train_memory_breakdown(1000, precision)
        assert (half.weights, half.gradients, half.master_weights, half.optimizer) == (2000, 2000, 4000, 8000)
        assert half.total == train_memory_bytes(1000, precision) == 16_000
    with pytest.raises(ValueError, match="precision"):
        train_memory_bytes(10, "int8")


def random_configs(n: int, seed: int = 0) -> list[ModelConfig]:
    rng = random.Random(seed)
    configs = []
    for _ in range(n):
        n_head = rng.choice([1, 2, 4])
        head_dim = rng.choice([4, 8, 16])
        configs.append(
            ModelConfig(
                n_layer=rng.randint(1, 5), d_model=n_head * head_dim, n_head=n_head,
                rotary_dim=rng.choice(range(2, head_dim + 1, 2)), vocab_size=rng.randint(2, 300),
                n_ctx=rng.choice([8, 64]), d_ff=rng.choice([None, rng.randint(1, 100)]),
            )
        )
    return configs


@pytest.mark.parametrize("cfg", [load_config("tiny").model, *random_configs(6)], ids=lambda c: str(c.n_layer))
def test_analytic_count_matches_module(cfg: ModelConfig) -> None:
    assert total_params(cfg) == sum(p.numel() for p in GPTJ(cfg).parameters())


@pytest.mark.parametrize("cfg", [load_config("tiny").model, *random_configs(4, seed=1)])
def test_stage_costs_sum_to_whole(cfg: ModelConfig) -> None:
    prof = model_profile(cfg, "bf16")
    whole = prof.total
    assert whole.params == total_params(cfg)
    for n_stages in range(1, cfg.n_layer + 1):
        costs = [prof.stage_cost(s, e) for s, e in split_layers(cfg.n_layer, n_stages)]
        assert sum(c.params for c in costs) == whole.params
        assert sum(c.train_flops_per_token for c in costs) == whole.train_flops_per_token
        assert sum(c.train_memory_bytes for c in costs) == whole.train_memory_bytes
        assert all(c.activation_bytes_per_token == cfg.d_model * 4 for c in costs)


def test_stage_cost_places_embedding_and_head() -> None:
    cfg = load_config("tiny").model
    prof = model_profile(cfg, "fp32")
    block = block_params(cfg)
    assert prof.stage_cost(0, 1).params == embedding_params(cfg) + block
    assert prof.stage_cost(1, 3).params == 2 * block
    assert prof.stage_cost(3, 4).params == block + head_params(cfg)
    with pytest.raises(ValueError):
        prof.stage_cost(2, 2)


def test_profile_module_does_not_import_torch() -> None:
    import ast
    import inspect

    import configs.profile as profile

    tree = ast.parse(inspect.getsource(profile))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m.split(".")[0] == "torch" for m in imported)
