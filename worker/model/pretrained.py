"""Load a stage's (or the whole model's) weights from a pretrained Hugging Face GPT-J checkpoint.

The directory was opened and checked with `configs.pretrained.open_pretrained`; this reads just
the tensors the module holds, one at a time, converting each to the module's dtype as it goes.
"""

from __future__ import annotations

import torch

from configs.pretrained import PretrainedCheckpoint, check_tensors, expected_shapes, read_tensors
from worker.model.gptj import GPTJSpan


@torch.no_grad()
def load_pretrained(module: GPTJSpan, checkpoint: PretrainedCheckpoint) -> int:
    """Copy the checkpoint's tensors for `module`'s layers into it; returns the bytes read.

    Raises configs.pretrained.PretrainedError, leaving the module as it was, when a tensor is
    missing or has another shape."""
    params = dict(module.named_parameters())
    expected = expected_shapes(module.config, module.layer_start, module.layer_end)
    if set(expected) != set(params):  # the model code and the checkpoint's naming must agree
        raise RuntimeError(f"GPT-J's parameters and the checkpoint names disagree: "
                           f"{sorted(set(expected) ^ set(params))[:4]}")
    check_tensors(checkpoint, expected)
    read = 0
    for name, tensor in read_tensors(checkpoint, expected):
        target = params[name]
        target.copy_(tensor.to(target.dtype))
        read += tensor.numel() * tensor.element_size()
    return read
