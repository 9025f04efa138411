"""Our GPT-J against Hugging Face's GPTJForCausalLM: same names, same logits, same loss."""

from __future__ import annotations

import pytest
import torch

from configs.schema import ModelConfig
from worker.model.gptj import GPTJ, lm_loss

transformers = pytest.importorskip("transformers")

SHAPES = {
    "partial-rotary": ModelConfig(n_layer=3, d_model=64, n_head=4, rotary_dim=8, vocab_size=97, n_ctx=64),
    # rotary over the whole head, and an MLP width other than 4 * d_model
    "full-rotary": ModelConfig(
        n_layer=2, d_model=48, n_head=3, rotary_dim=16, vocab_size=61, n_ctx=32, d_ff=80, layer_norm_epsilon=1e-6
    ),
}


def hf_model(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised HF GPT-J of the same shape, built from a config alone (no download)."""
    hf_cfg = transformers.GPTJConfig(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx, n_embd=cfg.d_model, n_layer=cfg.n_layer,
        n_head=cfg.n_head, rotary_dim=cfg.rotary_dim, n_inner=cfg.d_ff, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=cfg.layer_norm_epsilon,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = transformers.GPTJForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():  # HF inits biases to 0 and norms to 1; perturb them so they are tested too
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def tokens(cfg: ModelConfig, B: int = 3, T: int | None = None, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, T or cfg.n_ctx), generator=g)


@pytest.fixture(params=list(SHAPES), ids=list(SHAPES))
def pair(request) -> tuple[ModelConfig, torch.nn.Module, GPTJ]:
    cfg = SHAPES[request.param]
    hf = hf_model(cfg)
    ours = GPTJ(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return cfg, hf, ours


def test_same_parameter_names_and_no_buffers(pair) -> None:
    cfg, hf, ours = pair
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert set(ours.state_dict()) == {name for name, _ in ours.named_parameters()}


def test_logits_match(pair) -> None:
    cfg, hf, ours = pair
    ids = tokens(cfg)
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    assert got.shape == (3, cfg.n_ctx, cfg.vocab_size)
    assert (got - ref).abs().max().item() <= 1e-4


def test_our_weights_load_into_hf(pair) -> None:
    cfg, _, ours = pair
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    hf = hf_model(cfg, seed=5)
    hf.load_state_dict(ours.state_dict(), strict=True)
    ids = tokens(cfg, T=cfg.n_ctx // 2)
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_loss_and_gradients_match(pair) -> None:
    cfg, hf, ours = pair
    ids = tokens(cfg, B=2)
    ref = hf(ids, labels=ids).loss  # HF shifts labels inside
    got = lm_loss(ours(ids[:, :-1]), ids[:, 1:])  # our targets arrive shifted
    assert abs(got.item() - ref.item()) <= 1e-5
    ref.backward()
    got.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_too_long_sequence_raises() -> None:
    cfg = SHAPES["partial-rotary"]
    with pytest.raises(ValueError, match="n_ctx"):
        GPTJ(cfg)(tokens(cfg, B=1, T=cfg.n_ctx + 1))


def test_hidden_states_rejected_by_full_model() -> None:
    cfg = SHAPES["partial-rotary"]
    with pytest.raises(ValueError, match="token ids"):
        GPTJ(cfg)(torch.randn(1, 4, cfg.d_model))
