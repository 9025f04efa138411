"""Error feedback: what a lossy codec did not send this call is added to the next call's tensor.

One `ErrorFeedback` per tensor stream (a parameter's pseudo-gradient, say), wrapping that
stream's codec. Each `encode` compresses tensor + residual, decodes the result locally, and
keeps tensor + residual - decoded as the new residual, so over T calls the decoded tensors
sum to the inputs' sum minus the last residual: nothing is lost, only delayed. The top-k
and PowerSGD codecs are meant to be used this way.

The residual is float32 on the input's device, and so is what gets encoded: receivers
decode float32 whatever the input dtype. A tensor of another shape than the last one
starts afresh (the residual is dropped).
"""

from __future__ import annotations

import torch

from worker.compression.base import Codec, Encoded


class ErrorFeedback:
    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.residual: torch.Tensor | None = None

    def encode(self, tensor: torch.Tensor) -> Encoded:
        compensated = tensor.detach().to(torch.float32, copy=True)
        residual = self.residual
        if residual is not None and residual.shape == compensated.shape:
            compensated += residual.to(compensated.device)
        encoded = self.codec.encode(compensated)  # refuses non-finite values before any state changes
        decoded = self.codec.decode(encoded, device=compensated.device)
        self.residual = compensated.sub_(decoded)
        return encoded

    def reset(self) -> None:
        self.residual = None

    def __repr__(self) -> str:
        return f"ErrorFeedback({self.codec!r})"
