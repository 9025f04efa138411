"""Pipeline stages: a contiguous span of GPT-J blocks that one worker holds and trains.

A stage keeps the full model's parameter names (`transformer.h.7.attn.q_proj.weight`),
so stage state dicts are slices of the full one: checkpoints, replicas and re-plans move
tensors by name without renaming. The first stage also holds the token embedding, the
last the final norm and `lm_head`.
"""

from __future__ import annotations

import torch

from configs.schema import ModelConfig
from worker.model.gptj import GPTJ, GPTJSpan, init_parameters, lm_loss


class StageModule(GPTJSpan):
    """Blocks [layer_start, layer_end) of the model; see GPTJSpan for inputs and outputs."""

    @classmethod
    def from_model(cls, model: GPTJ, layer_start: int, layer_end: int) -> StageModule:
        """A stage holding copies of `model`'s weights for the span (same device and dtype)."""
        stage = cls(model.config, layer_start, layer_end)
        ref = next(model.parameters())
        stage.to(device=ref.device, dtype=ref.dtype)
        full = model.state_dict()
        stage.load_state_dict({name: full[name] for name in stage.state_dict()}, strict=True)
        return stage

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the last stage's logits (B, T, V) against shifted targets (B, T)."""
        return lm_loss(logits, targets)


def build_stage(config: ModelConfig, layer_start: int, layer_end: int, seed: int) -> StageModule:
    """A freshly initialised stage: identical to the span of `GPTJ` initialised with `seed`."""
    stage = StageModule(config, layer_start, layer_end)
    init_parameters(stage, seed, config.init_std)
    return stage


def split_layers(n_layer: int, n_stages: int) -> list[tuple[int, int]]:
    """Split n_layer blocks into n_stages contiguous half-open spans whose sizes differ by at most one.

    The first `n_layer % n_stages` spans get the extra block.
    """
    if n_stages < 1:
        raise ValueError(f"n_stages must be >= 1 (got {n_stages})")
    if n_stages > n_layer:
        raise ValueError(f"cannot split {n_layer} layers into {n_stages} stages: every stage needs a layer")
    base, extra = divmod(n_layer, n_stages)
    spans, start = [], 0
    for k in range(n_stages):
        end = start + base + (1 if k < extra else 0)
        spans.append((start, end))
        start = end
    return spans
