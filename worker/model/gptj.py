"""GPT-J, computing exactly what Hugging Face's GPTJForCausalLM computes.

One block: x + attn(ln_1(x)) + mlp(ln_1(x)) -- attention and MLP read the same normed
input and run in parallel. Rotary position embedding on the first `rotary_dim` dims of
each query/key head, with interleaved pairs (dims 2i and 2i+1 rotate together).

Parameter names are Hugging Face's (`transformer.h.3.attn.q_proj.weight`, ...), so a HF
GPT-J state dict loads with strict=True. `GPTJSpan` holds any contiguous run of blocks
(plus the embedding when it starts at 0 and the head when it ends at n_layer) under the
same global names: the full model is the span (0, n_layer), a pipeline stage is any
other span (worker/model/stage.py).
"""

from __future__ import annotations

import functools
import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from configs.schema import ModelConfig

ROTARY_BASE = 10000.0


# ----------------------------------------------------------------------------- rotary


@functools.lru_cache(maxsize=16)
def rotary_sin_cos(T: int, rotary_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """sin, cos tables (T, rotary_dim), each frequency repeated for its pair of dims. fp32."""
    # same arithmetic as HF (int exponent / dim, fp32 powers) so the tables match bit for bit
    inv_freq = 1.0 / (ROTARY_BASE ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64) / rotary_dim))
    angles = torch.arange(T, dtype=torch.int64).float()[:, None] * inv_freq  # (T, rd/2)
    sin = angles.sin().repeat_interleave(2, dim=-1)  # (T, rd): [s0, s0, s1, s1, ...]
    cos = angles.cos().repeat_interleave(2, dim=-1)
    return sin.to(device), cos.to(device)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): a 90 degree turn of each pair."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((-odd, even), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotate the first `rotary_dim` dims of every head of x (B, T, nh, hs); the rest pass through."""
    T = x.size(1)
    sin, cos = rotary_sin_cos(T, rotary_dim, x.device)
    sin, cos = sin.to(x.dtype)[:, None, :], cos.to(x.dtype)[:, None, :]  # (T, 1, rd): broadcast over heads
    rot, keep = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rot * cos + rotate_every_two(rot) * sin, keep), dim=-1)


# ----------------------------------------------------------------------------- modules


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_head, self.head_dim, self.rotary_dim = config.n_head, config.head_dim, config.rotary_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)
        self.attn_dropout = config.dropout  # applied to the attention weights inside SDPA
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        heads = (B, T, self.n_head, self.head_dim)
        q = apply_rotary(self.q_proj(x).view(heads), self.rotary_dim)  # (B, T, nh, hs)
        k = apply_rotary(self.k_proj(x).view(heads), self.rotary_dim)  # (B, T, nh, hs)
        v = self.v_proj(x).view(heads)  # (B, T, nh, hs)
        q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))  # (B, nh, T, hs)
        # scores and softmax in fp32 as HF does: fp16 scores can overflow, bf16 ones lose precision
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.attn_dropout if self.training else 0.0
        )  # (B, nh, T, hs), scaled by 1/sqrt(hs)
        y = y.to(x.dtype).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.out_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.d_model, config.inner_dim)
        self.fc_out = nn.Linear(config.inner_dim, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc_in(x), approximate="tanh")  # (B, T, ff): "gelu_new"
        return self.dropout(self.fc_out(h))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)  # one norm feeds both branches
        return x + self.attn(h) + self.mlp(h)  # (B, T, C)


class GPTJSpan(nn.Module):
    """Blocks [layer_start, layer_end) of GPT-J under their global names.

    Holds `transformer.wte` when it starts at block 0 and `transformer.ln_f` + `lm_head`
    when it ends at the last block. Input: token ids (B, T) for a first span, hidden
    states (B, T, C) otherwise. Output: logits (B, T, V) for a last span, hidden otherwise.
    """

    def __init__(self, config: ModelConfig, layer_start: int, layer_end: int) -> None:
        super().__init__()
        if not 0 <= layer_start < layer_end <= config.n_layer:
            raise ValueError(
                f"layer span [{layer_start}, {layer_end}) is not a non-empty part of [0, {config.n_layer})"
            )
        self.config = config
        self.layer_start, self.layer_end = layer_start, layer_end
        parts: dict[str, nn.Module] = {}
        if self.is_first:
            parts["wte"] = nn.Embedding(config.vocab_size, config.d_model)
            parts["drop"] = nn.Dropout(config.dropout)
        # keyed by global block index, so names match the full model's
        parts["h"] = nn.ModuleDict({str(i): Block(config) for i in range(layer_start, layer_end)})
        if self.is_last:
            parts["ln_f"] = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.transformer = nn.ModuleDict(parts)
        # untied from wte, with bias: as GPT-J 6B was trained
        self.lm_head = nn.Linear(config.d_model, config.vocab_size) if self.is_last else None

    @property
    def is_first(self) -> bool:
        return self.layer_start == 0

    @property
    def is_last(self) -> bool:
        return self.layer_end == self.config.n_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.is_first:
            x = self.transformer.drop(self.transformer.wte(x))  # (B, T, C)
        for block in self.transformer.h.values():
            x = block(x)  # (B, T, C)
        if self.is_last:
            x = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        return x

    def _check_input(self, x: torch.Tensor) -> None:
        if self.is_first and (x.dim() != 2 or x.is_floating_point()):
            raise ValueError(f"the first span takes token ids (B, T); got {x.dtype} {tuple(x.shape)}")
        if not self.is_first and (x.dim() != 3 or x.size(-1) != self.config.d_model):
            raise ValueError(
                f"span starting at block {self.layer_start} takes hidden states "
                f"(B, T, {self.config.d_model}); got {tuple(x.shape)}"
            )
        if x.size(1) > self.config.n_ctx:
            raise ValueError(f"sequence length {x.size(1)} exceeds the model's n_ctx={self.config.n_ctx}")


class GPTJ(GPTJSpan):
    """The whole model: token ids (B, T) -> logits (B, T, V)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, 0, config.n_layer)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy. targets (B, T) are already shifted: targets[t] follows input[t]."""
    # fp32 log-softmax: bf16 logits lose too much in the normaliser over a large vocabulary
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


# ----------------------------------------------------------------------------- init


def param_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from the run seed and a parameter's global name (stable across processes)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def init_parameters(module: nn.Module, seed: int, init_std: float) -> None:
    """GPT-J init where every parameter depends only on (seed, its global name).

    Linear/Embedding weights ~ N(0, init_std), biases 0, LayerNorm weight 1 bias 0. Because
    nothing depends on what else the module holds, a stage built alone gets the same
    weights as the same blocks inside the full model. Pass a module whose parameter names
    are the global ones (GPTJ, a stage), not a bare Block.
    """
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            full_name = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, nn.LayerNorm):
                p.fill_(1.0 if p_name == "weight" else 0.0)
            elif p_name == "bias":
                p.zero_()
            elif isinstance(mod, (nn.Linear, nn.Embedding)):
                # drawn on CPU in fp32 so every device and dtype sees the same numbers
                gen = torch.Generator(device="cpu").manual_seed(param_seed(seed, full_name))
                w = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, init_std, generator=gen)
                p.copy_(w)
            else:
                raise TypeError(f"init_parameters has no rule for {full_name} ({type(mod).__name__})")

