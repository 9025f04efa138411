"""Mixed precision: where `training.precision` applies, and how.

bf16 (or fp16) autocast on a GPU for the forward and its recomputation in the backward; the
weights, their gradients and AdamW's state stay fp32 (16 B/param, configs/memory.py counts the
autocast copies beside them). A CPU trains in fp32 whatever the config says: CPU autocast is
slower than fp32 on the machines volunteers have, and fp32 keeps tests exact.
"""

from __future__ import annotations

import contextlib

import torch


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for a forward on `device` at `precision` (a no-op on a CPU or at fp32)."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)
