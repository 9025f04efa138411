"""What a stage takes: a request's tensors checked before any compute, its outputs after.

A request that fails a check is refused whole (`RequestRejected`, "bad_request"), before the
stage computes anything or touches its gradient; every replica would refuse it alike, so the
caller does not try it elsewhere (worker.pipeline.errors). Outputs that are not finite are
refused too ("non_finite"): sent on, they would poison every stage after this one.
"""

from __future__ import annotations

import torch

from worker.model.stage import StageModule
from worker.pipeline.errors import RequestRejected

IGNORE_INDEX = -100  # lm_loss's ignore_index: padding targets the loss skips
_TOKEN_DTYPES = (torch.int64, torch.int32, torch.int16)


def check_inputs(stage: StageModule, x: torch.Tensor, max_tokens: int, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """`x` on `device` if `stage` takes it: token ids for a first stage, finite hidden states
    else, within the context length and `max_tokens` in all."""
    cfg = stage.config
    if stage.is_first:
        if x.dim() != 2 or x.dtype not in _TOKEN_DTYPES:
            raise _bad(f"the first stage takes int64 token ids (B, T); got {x.dtype} {tuple(x.shape)}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= cfg.vocab_size):
            raise _bad(f"token ids must lie in [0, {cfg.vocab_size})")
    else:
        if x.dim() != 3 or x.size(-1) != cfg.d_model or not x.is_floating_point():
            raise _bad(
                f"stage at block {stage.layer_start} takes float hidden states "
                f"(B, T, {cfg.d_model}); got {x.dtype} {tuple(x.shape)}"
            )
        if not bool(torch.isfinite(x).all()):
            raise _bad("hidden states hold NaN or infinite values")
    batch, length = x.size(0), x.size(1)
    if batch == 0 or length == 0:
        raise _bad(f"empty batch {tuple(x.shape)}")
    if length > cfg.n_ctx:
        raise _bad(f"sequence length {length} exceeds n_ctx={cfg.n_ctx}")
    if batch * length > max_tokens:
        raise _bad(f"{batch * length:,} tokens in one request (this stage takes at most {max_tokens:,})")
    if x.is_floating_point():
        return x.to(device, dtype)
    return x.to(device, torch.int64)


def check_grad_outputs(stage: StageModule, g: torch.Tensor, x: torch.Tensor, device: torch.device,
                       dtype: torch.dtype) -> torch.Tensor:
    """`g` on `device` if it is a finite gradient of `stage`'s outputs for inputs `x`."""
    cfg = stage.config
    width = cfg.vocab_size if stage.is_last else cfg.d_model
    expected = (x.size(0), x.size(1), width)
    if tuple(g.shape) != expected or not g.is_floating_point():
        raise _bad(f"grad_outputs must be float {expected}; got {g.dtype} {tuple(g.shape)}")
    if not bool(torch.isfinite(g).all()):
        raise _bad("grad_outputs hold NaN or infinite values")
    return g.to(device, dtype)


def check_targets(stage: StageModule, y: torch.Tensor, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`y` on `device` if it holds a target per token of `x`, at least one of them not ignored."""
    vocab = stage.config.vocab_size
    if tuple(y.shape) != (x.size(0), x.size(1)) or y.dtype not in _TOKEN_DTYPES:
        raise _bad(f"targets must be int64 {(x.size(0), x.size(1))}; got {y.dtype} {tuple(y.shape)}")
    y = y.to(torch.int64)  # compared in int16, a vocabulary of 32,768 or more wraps negative
    valid = (y >= 0) & (y < vocab)
    if not bool((valid | (y == IGNORE_INDEX)).all()):
        raise _bad(f"targets must lie in [0, {vocab}) or be {IGNORE_INDEX}")
    if not bool(valid.any()):
        raise _bad(f"every target is {IGNORE_INDEX}: the loss would be undefined")
    return y.to(device, torch.int64)


def refuse_non_finite(outputs: torch.Tensor) -> None:
    if not bool(torch.isfinite(outputs).all()):
        raise RequestRejected("non_finite", "the stage's outputs are not finite")


def _bad(message: str) -> RequestRejected:
    return RequestRejected("bad_request", message)


__all__ = ["IGNORE_INDEX", "check_grad_outputs", "check_inputs", "check_targets", "refuse_non_finite"]
