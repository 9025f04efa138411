"""Pipeline stages: slices of the full model by name, and chained they compute what it computes."""

from __future__ import annotations

import pytest
import torch

from configs.schema import ModelConfig
from worker.model.gptj import GPTJ, init_parameters, lm_loss
from worker.model.stage import StageModule, build_stage, split_layers

CFG = ModelConfig(n_layer=4, d_model=32, n_head=4, rotary_dim=4, vocab_size=53, n_ctx=16)
SPLITS = [[(0, 4)], [(0, 1), (1, 4)], [(0, 2), (2, 3), (3, 4)], [(0, 1), (1, 2), (2, 3), (3, 4)]]


def full_model(seed: int = 0) -> GPTJ:
    model = GPTJ(CFG).eval()
    init_parameters(model, seed, CFG.init_std)
    with torch.no_grad():  # non-trivial biases and norms, so their gradients are tested
        g = torch.Generator().manual_seed(seed + 100)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def batch(B: int = 2, T: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, CFG.vocab_size, (B, T + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def pipeline_step(stages: list[StageModule], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Forward and backward the way the pipeline does: each stage sees a detached input."""
    inputs, outputs = [], []
    for stage in stages:
        if stage.is_first:
            inputs.append(x)
        else:
            inputs.append(outputs[-1].detach().requires_grad_(True))
        outputs.append(stage(inputs[-1]))
    loss = stages[-1].loss(outputs[-1], y)
    loss.backward()
    for k in range(len(stages) - 2, -1, -1):  # hand each boundary gradient back one stage
        outputs[k].backward(inputs[k + 1].grad)
    return loss.detach()


@pytest.mark.parametrize("split", SPLITS, ids=str)
def test_stage_keys_partition_full_model(split) -> None:
    model = full_model()
    key_sets = [set(StageModule.from_model(model, s, e).state_dict()) for s, e in split]
    assert sum(len(k) for k in key_sets) == len(set().union(*key_sets))  # disjoint
    assert set().union(*key_sets) == set(model.state_dict())  # and complete


def test_stage_names_are_global() -> None:
    names = set(StageModule(CFG, 2, 4).state_dict())
    assert "transformer.h.2.ln_1.weight" in names and "transformer.h.3.mlp.fc_out.bias" in names
    assert "lm_head.bias" in names and "transformer.ln_f.weight" in names
    assert not any(n.startswith(("transformer.h.0.", "transformer.h.1.", "transformer.wte")) for n in names)


@pytest.mark.parametrize("split", SPLITS, ids=str)
def test_chained_stages_match_full_model(split) -> None:
    x, y = batch()
    model = full_model()
    stages = [StageModule.from_model(model, s, e).eval() for s, e in split]

    ref = lm_loss(model(x), y)
    ref.backward()
    got = pipeline_step(stages, x, y)

    assert abs(got.item() - ref.item()) <= 1e-6
    full_params = dict(model.named_parameters())
    for stage in stages:
        for name, p in stage.named_parameters():
            torch.testing.assert_close(p.grad, full_params[name].grad, atol=1e-6, rtol=0, msg=name)


def test_from_model_copies_weights() -> None:
    model = full_model()
    stage = StageModule.from_model(model, 1, 3)
    full = model.state_dict()
    for name, t in stage.state_dict().items():
        assert torch.equal(t, full[name])
        assert t.data_ptr() != full[name].data_ptr()  # a copy, not a view into the model


@pytest.mark.parametrize("span", [(0, 1), (1, 3), (2, 4), (0, 4)])
def test_build_stage_matches_full_model_init(span) -> None:
    model = GPTJ(CFG)
    init_parameters(model, 1234, CFG.init_std)
    full = model.state_dict()
    stage = build_stage(CFG, *span, seed=1234)
    for name, t in stage.state_dict().items():
        assert torch.equal(t, full[name]), name


def test_init_values_and_seed_dependence() -> None:
    a, b = build_stage(CFG, 0, 4, seed=1), build_stage(CFG, 0, 4, seed=2)
    wa, wb = a.state_dict(), b.state_dict()
    assert torch.equal(wa["transformer.ln_f.weight"], torch.ones(CFG.d_model))
    assert torch.equal(wa["lm_head.bias"], torch.zeros(CFG.vocab_size))
    assert torch.equal(wa["transformer.h.0.mlp.fc_in.bias"], torch.zeros(CFG.inner_dim))
    for name in ("transformer.wte.weight", "transformer.h.1.attn.q_proj.weight", "lm_head.weight"):
        assert not torch.equal(wa[name], wb[name]), name
    # blocks are not copies of each other
    assert not torch.equal(wa["transformer.h.0.attn.k_proj.weight"], wa["transformer.h.1.attn.k_proj.weight"])
    std = wa["transformer.wte.weight"].std().item()
    assert abs(std - CFG.init_std) < 0.1 * CFG.init_std


def test_middle_stage_takes_hidden_states() -> None:
    stage = build_stage(CFG, 1, 3, seed=0)
    h = torch.randn(2, 5, CFG.d_model)
    assert stage(h).shape == (2, 5, CFG.d_model)
    with pytest.raises(ValueError, match="hidden states"):
        stage(torch.zeros(2, 5, dtype=torch.long))


def test_bad_span_rejected() -> None:
    for span in [(2, 2), (3, 1), (-1, 2), (0, 5)]:
        with pytest.raises(ValueError):
            StageModule(CFG, *span)


@pytest.mark.parametrize("n_layer,n_stages", [(4, 1), (4, 4), (28, 3), (28, 5), (7, 2), (10, 4)])
def test_split_layers_balanced(n_layer, n_stages) -> None:
    spans = split_layers(n_layer, n_stages)
    assert len(spans) == n_stages
    assert spans[0][0] == 0 and spans[-1][1] == n_layer
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous
    sizes = [e - s for s, e in spans]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_split_layers_examples_and_errors() -> None:
    assert split_layers(28, 3) == [(0, 10), (10, 19), (19, 28)]
    assert split_layers(4, 2) == [(0, 2), (2, 4)]
    with pytest.raises(ValueError, match="n_stages"):
        split_layers(4, 0)
    with pytest.raises(ValueError, match="5 stages"):
        split_layers(4, 5)
