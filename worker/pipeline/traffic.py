"""Pipeline traffic by payload kind: the wire bytes of activations and of gradients.

The stage client and server count them where they encode and decode a message, since they know
the role of each tensor in it. A message's bytes go to the kinds of the tensors it carries: each
tensor's parts to its kind, and what is no tensor part (metadata, framing) to the message's first
kind, so that a message's kinds add up to its wire bytes. Most messages carry one kind; only a
`backward` request carries both (its inputs and their gradients), and only there are frames
looked into (`FrameTally`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from hivemind.proto import runtime_pb2

Kind = Literal["activation", "gradient"]
KINDS: tuple[Kind, ...] = ("activation", "gradient")


@dataclass
class KindBytes:
    sent: int = 0  # wire bytes, as ClientStats / StageStats count them
    received: int = 0
    uncompressed: int = 0  # the sent tensors' own bytes, before any codec


@dataclass(eq=False)
class Traffic:
    """Totals by kind since the client or server started (the reader takes deltas)."""

    by_kind: dict[Kind, KindBytes] = field(default_factory=lambda: {k: KindBytes() for k in KINDS})

    def sent(self, split: dict[Kind, int], uncompressed: dict[Kind, int] | None = None) -> None:
        for kind, n in split.items():
            self.by_kind[kind].sent += n
        for kind, n in (uncompressed or {}).items():
            self.by_kind[kind].uncompressed += n

    def received(self, split: dict[Kind, int]) -> None:
        for kind, n in split.items():
            self.by_kind[kind].received += n


@dataclass(frozen=True)
class MessageKinds:
    """What a message of one stage method carries: its tensors' kinds in order, and the kind its
    bytes count as where it has no tensors (an error, stage 1's empty gradient)."""

    tensors: tuple[Kind, ...]
    default: Kind

    @property
    def mixed(self) -> bool:
        return len(set(self.tensors)) > 1

    def whole(self, wire_bytes: int) -> dict[Kind, int]:
        """A one-kind message's bytes."""
        return {self.tensors[0] if self.tensors else self.default: wire_bytes}


# what each stage method's request carries, and what its answer is
REQUEST_KINDS = {
    "forward": MessageKinds(("activation",), "activation"),
    "backward": MessageKinds(("activation", "gradient"), "activation"),
    "forward_backward": MessageKinds(("activation", "activation"), "activation"),
}
ANSWER_KINDS: dict[str, Kind] = {"forward": "activation", "backward": "gradient", "forward_backward": "gradient"}


def nbytes_by_kind(tensors: Sequence[torch.Tensor | None], kinds: MessageKinds) -> dict[Kind, int]:
    """The tensors' own bytes (uncompressed) by kind."""
    out: dict[Kind, int] = {}
    for i, tensor in enumerate(tensors):
        if tensor is not None:
            kind = kinds.tensors[i] if i < len(kinds.tensors) else kinds.default
            out[kind] = out.get(kind, 0) + tensor.numel() * tensor.element_size()
    return out


class FrameTally:
    """One message's wire bytes per tensor, as its frames pass (a tensor starts at a part with a
    dtype, as worker.pipeline.wire reads them)."""

    def __init__(self) -> None:
        self.total = 0
        self.groups: list[int] = []  # bytes of each tensor's parts, in the order they came
        self._metadata = b""
        self._first = True

    def observe(self, frame: runtime_pb2.ExpertRequest | runtime_pb2.ExpertResponse) -> None:
        self.total += frame.ByteSize()
        if self._first:
            self._metadata, self._first = frame.metadata, False
        for part in frame.tensors:
            if part.dtype or not self.groups:
                self.groups.append(0)
            self.groups[-1] += part.ByteSize()

    def observe_all(self, frames: Iterable[Any]) -> FrameTally:
        for frame in frames:
            self.observe(frame)
        return self

    async def watch(self, frames: AsyncIterable[Any]) -> AsyncIterator[Any]:
        async for frame in frames:
            self.observe(frame)
            yield frame

    def split(self, kinds: MessageKinds) -> dict[Kind, int]:
        """The message's bytes by kind: each of the payload's tensors to its kind (a tensor a codec
        sent in several parts, per the metadata's layout, counts as one), the rest to the first."""
        sizes = _per_tensor(self.groups, self._metadata)
        out: dict[Kind, int] = {}
        for i, size in enumerate(sizes):
            kind = kinds.tensors[i] if i < len(kinds.tensors) else kinds.default
            out[kind] = out.get(kind, 0) + size
        first = kinds.tensors[0] if kinds.tensors else kinds.default
        out[first] = out.get(first, 0) + self.total - sum(sizes)
        return out


def _per_tensor(groups: list[int], metadata: bytes) -> list[int]:
    """Group sizes folded back onto the payload's tensors where a codec split them into parts
    (the metadata's "layout"); the groups themselves where there is none or it does not fit."""
    try:
        layout = json.loads(metadata).get("layout") if metadata else None
    except (ValueError, UnicodeDecodeError, AttributeError):
        layout = None
    if not isinstance(layout, list):
        return groups
    sizes, at = [], 0
    for entry in layout:
        n = entry.get("parts", 1) if isinstance(entry, dict) else 1
        if not isinstance(n, int) or n < 1 or at + n > len(groups):
            return groups
        sizes.append(sum(groups[at:at + n]))
        at += n
    return sizes if at == len(groups) else groups
