"""Calling pipeline stages on other peers: one method per stage handler, with typed failures.

Each call opens a libp2p stream to the peer, sends the request frames, and reads the
answer (worker.pipeline.wire). What can go wrong is sorted for `call_with_failover`:
`RequestRejected` when the stage refused the request itself, a `RetryableError` (or a
daemon / timeout / connection error) when this replica failed it. `traffic` counts the stage
methods' wire bytes by payload kind, activations and gradients (worker.pipeline.traffic).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass

import torch
from hivemind.p2p import P2P, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.multiaddr import Multiaddr

from worker.pipeline.attempts import StepTag
from worker.pipeline.errors import BadResponse, NoAnswer, RequestRejected, StageUnavailable, WireError
from worker.pipeline.failover import ReplicaPicker, call_with_failover
from worker.pipeline.pacing import Pacer, frame_bytes, paced
from worker.pipeline.traffic import ANSWER_KINDS, REQUEST_KINDS, FrameTally, Traffic, nbytes_by_kind
from worker.pipeline.wire import (
    WIRE_CHUNK_BYTES,
    Payload,
    Received,
    WireCodec,
    codec_meta,
    encode_frames,
    handler_name,
    narrow_ids,
    read_frames,
    request_frames,
)

__all__ = ["ClientStats", "ReplicaPicker", "StageClient", "call_with_failover"]

DEFAULT_TIMEOUT_S = 60.0
# an answer is never larger than a request of the same microbatch, except the last stage's
# logits from `forward`; this only stops a broken peer from filling our memory
DEFAULT_MAX_RESPONSE_BYTES = 8 << 30


@dataclass
class ClientStats:
    calls: int = 0
    bytes_out: int = 0  # protobuf frame bytes sent, what the stream carries before libp2p framing
    bytes_in: int = 0
    seconds: float = 0.0  # wall time inside successful calls


class StageClient:
    """Calls `forward`, `backward` and `forward_backward` of stages served by other peers."""

    def __init__(
        self,
        p2p: P2P,
        *,
        chunk_bytes: int = WIRE_CHUNK_BYTES,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        self.p2p = p2p
        self.chunk_bytes = chunk_bytes
        self.max_response_bytes = max_response_bytes
        self.stats = ClientStats()
        self.traffic = Traffic()  # the stage methods' bytes by kind; `call` counts in `stats` only
        self._addresses: dict[PeerID, list[Multiaddr]] = {}
        self._connected: set[PeerID] = set()

    def add_addresses(self, peer_id: PeerID, maddrs: Iterable[Multiaddr | str]) -> None:
        """Where `peer_id` listens; the first call to it dials these instead of asking the DHT."""
        own = f"/p2p/{peer_id.to_base58()}"
        addresses = []
        for maddr in maddrs:
            maddr = Multiaddr(str(maddr))
            # the daemon wants transport addresses; the peer id travels separately
            addresses.append(maddr.decapsulate(Multiaddr(own)) if "p2p" in maddr else maddr)
        if addresses:
            self._addresses[peer_id] = addresses
            self._connected.discard(peer_id)

    # ---- the stage methods -----------------------------------------------------------

    async def forward(
        self,
        peer_id: PeerID,
        key: str,
        inputs: torch.Tensor,
        codec: WireCodec = "none",
        timeout: float = DEFAULT_TIMEOUT_S,
        *,
        seed: int | None = None,
    ) -> torch.Tensor:
        """The stage's outputs for `inputs`: hidden states (B, T, d_model), or logits from the last stage."""
        sent = inputs if inputs.is_floating_point() else narrow_ids(inputs)
        reply = await self._call(peer_id, key, "forward", Payload([sent]), codec, timeout, seed,
                                 counted=(inputs,))
        (outputs,) = _tensors(reply, 1, peer_id, "forward")
        if outputs.dim() != 3 or tuple(outputs.shape[:2]) != tuple(inputs.shape[:2]):
            raise BadResponse(
                f"{_short(peer_id)}: forward returned {tuple(outputs.shape)} for {tuple(inputs.shape)}"
            )
        return outputs

    async def backward(
        self,
        peer_id: PeerID,
        key: str,
        inputs: torch.Tensor,
        grad_outputs: torch.Tensor,
        codec: WireCodec = "none",
        timeout: float = DEFAULT_TIMEOUT_S,
        *,
        seed: int | None = None,
        tag: StepTag | None = None,
    ) -> torch.Tensor | None:
        """Recompute and backprop on the stage (accumulating its gradients); the gradient wrt `inputs`.

        None for a first stage, whose inputs are token ids. `tag`: the driver's step and attempt.
        """
        payload = Payload([inputs, grad_outputs], roles=["activation", "gradient"])
        reply = await self._call(peer_id, key, "backward", payload, codec, timeout, seed, tag,
                                 counted=(inputs, grad_outputs))
        return _grad_inputs(reply, inputs, peer_id, "backward")

    async def forward_backward(
        self,
        peer_id: PeerID,
        key: str,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        codec: WireCodec = "none",
        timeout: float = DEFAULT_TIMEOUT_S,
        *,
        seed: int | None = None,
        tag: StepTag | None = None,
    ) -> tuple[float, torch.Tensor | None]:
        """Last stage: (mean loss, gradient wrt `hidden`); the stage accumulates its own gradients."""
        reply = await self._call(
            peer_id, key, "forward_backward", Payload([hidden, narrow_ids(targets)]), codec, timeout, seed, tag,
            counted=(hidden, targets),
        )
        loss = reply.meta.get("loss")
        if not isinstance(loss, int | float) or isinstance(loss, bool) or not math.isfinite(loss):
            raise BadResponse(f"{_short(peer_id)}: forward_backward returned loss {loss!r}")
        return float(loss), _grad_inputs(reply, hidden, peer_id, "forward_backward")

    async def call(
        self, peer_id: PeerID, key: str, method: str, payload: Payload, codec: WireCodec = "none",
        timeout: float = DEFAULT_TIMEOUT_S, *, pacer: Pacer | None = None,
    ) -> Payload:
        """Any other handler of the stage under `key` (e.g. "state"): its reply, errors typed as above.
        With `pacer`, the request goes out in small frames at the pacer's rate (a bulk transfer)."""
        return await self._call(peer_id, key, method, payload, codec, timeout, None, pacer=pacer)

    # ---- one call ----------------------------------------------------------------------

    async def _call(
        self,
        peer_id: PeerID,
        key: str,
        method: str,
        payload: Payload,
        codec: WireCodec,
        timeout: float,
        seed: int | None,
        tag: StepTag | None = None,
        *,
        pacer: Pacer | None = None,
        counted: tuple[torch.Tensor, ...] | None = None,
    ) -> Payload:
        """One call; `counted`: a stage method's tensors as the caller gave them, counted in `traffic`
        (their own bytes as the uncompressed ones)."""
        payload.meta = {**payload.meta, **codec_meta(codec), **({"seed": seed} if seed is not None else {}),
                        **({"step": tag.to_wire()} if tag is not None else {})}
        frames = await encode_frames(request_frames(key, payload, codec, frame_bytes(pacer, self.chunk_bytes)))
        sent = sum(frame.ByteSize() for frame in frames)
        started = time.perf_counter()
        try:
            received = await asyncio.wait_for(
                self._exchange(peer_id, handler_name(key, method), frames, pacer), timeout
            )
        except P2PHandlerError as err:
            raise StageUnavailable(f"{_short(peer_id)}: {method} failed on the peer: {err}") from None
        except WireError as err:
            raise BadResponse(f"{_short(peer_id)}: {method} answer is malformed: {err}") from None
        if received is None:
            raise NoAnswer(f"{_short(peer_id)}: {method} stream closed without an answer")
        self.stats.calls += 1
        self.stats.bytes_out += sent
        self.stats.bytes_in += received.wire_bytes
        self.stats.seconds += time.perf_counter() - started
        if counted is not None:
            self._count(method, counted, frames, sent, received.wire_bytes)
        error = received.payload.meta.get("error")
        if error is not None:
            kind = error.get("kind", "bad_request") if isinstance(error, dict) else "bad_request"
            message = error.get("message", "") if isinstance(error, dict) else str(error)
            raise RequestRejected(str(kind), f"{key}.{method} at {_short(peer_id)}: {message}")
        return received.payload

    def _count(self, method: str, tensors: tuple[torch.Tensor, ...],
               frames: Sequence[runtime_pb2.ExpertRequest], sent: int, received: int) -> None:
        kinds = REQUEST_KINDS[method]
        split = FrameTally().observe_all(frames).split(kinds) if kinds.mixed else kinds.whole(sent)
        self.traffic.sent(split, nbytes_by_kind(tensors, kinds))
        self.traffic.received({ANSWER_KINDS[method]: received})

    async def _exchange(
        self, peer_id: PeerID, handler: str, frames: Sequence[runtime_pb2.ExpertRequest],
        pacer: Pacer | None = None,
    ) -> Received | None:
        await self._ensure_connected(peer_id)
        stream = await self.p2p.iterate_protobuf_handler(
            peer_id, handler, paced(frames, pacer), runtime_pb2.ExpertResponse
        )
        async with contextlib.aclosing(stream):
            return await read_frames(_until_error(stream), max_bytes=self.max_response_bytes)

    async def _ensure_connected(self, peer_id: PeerID) -> None:
        if peer_id in self._connected or peer_id not in self._addresses:
            return  # connected already, or left to the daemon's own routing (DHT)
        # hivemind's P2P has no public connect; its daemon client does, and P2P itself uses
        # it this way. Without it the daemon can dial only peers it has heard of.
        await self.p2p._client.connect(peer_id, self._addresses[peer_id])
        self._connected.add(peer_id)


async def _until_error(
    stream: AsyncIterator[runtime_pb2.ExpertResponse],
) -> AsyncIterator[runtime_pb2.ExpertResponse]:
    """The answer frames; once the stage has answered with an error, a broken stream is expected.

    A stage that refuses a request mid-upload (too large, malformed) answers and closes
    the stream while request frames are still being written: the write then fails, and
    that must not hide the refusal.
    """
    refused = False
    try:
        async for frame in stream:
            refused = refused or _is_refusal(frame)
            yield frame
    except (ConnectionError, asyncio.IncompleteReadError):
        if not refused:
            raise


def _is_refusal(frame: runtime_pb2.ExpertResponse) -> bool:
    if not frame.metadata:
        return False
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        meta = json.loads(frame.metadata)
        return isinstance(meta, dict) and "error" in meta
    return False


def _tensors(reply: Payload, count: int, peer_id: PeerID, method: str) -> list[torch.Tensor]:
    if len(reply.tensors) != count:
        raise BadResponse(
            f"{_short(peer_id)}: {method} returned {len(reply.tensors)} tensors, expected {count}"
        )
    return reply.tensors


def _grad_inputs(reply: Payload, inputs: torch.Tensor, peer_id: PeerID, method: str) -> torch.Tensor | None:
    if not inputs.is_floating_point():
        _tensors(reply, 0, peer_id, method)
        return None
    (grad,) = _tensors(reply, 1, peer_id, method)
    if grad.shape != inputs.shape:
        raise BadResponse(
            f"{_short(peer_id)}: {method} returned a {tuple(grad.shape)} gradient for {tuple(inputs.shape)}"
        )
    return grad


def _short(peer_id: PeerID) -> str:
    return f"peer …{peer_id.to_base58()[-8:]}"
