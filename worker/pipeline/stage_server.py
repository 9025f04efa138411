"""A pipeline stage served over P2P: `forward`, `backward` and `forward_backward` for one stage key.

Each handler reads one request (a stream of frames, see worker.pipeline.wire), runs it on
the stage's `StageExecutor` and streams the answer back in the request's codec. A request
the stage refuses (bad shape, dtype, values, size) is answered with an error in the
response metadata rather than a handler exception, so the caller learns it must not retry
it elsewhere, and the stage's parameters are never touched.

`traffic` counts the wire bytes of requests and answers by payload kind, activations and
gradients (worker.pipeline.traffic); the last stage hands each loss it computes to `on_loss`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Self

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from worker.model.stage import StageModule
from worker.pipeline.attempts import StepTag
from worker.pipeline.errors import RequestRejected, WireError
from worker.pipeline.executor import StageExecutor, StageStats
from worker.pipeline.traffic import (
    ANSWER_KINDS,
    REQUEST_KINDS,
    FrameTally,
    MessageKinds,
    Traffic,
    nbytes_by_kind,
)
from worker.pipeline.wire import (
    WIRE_CHUNK_BYTES,
    Payload,
    WireCodec,
    codec_from_meta,
    encode_frames,
    handler_name,
    read_frames,
    response_frames,
)

METHODS = ("forward", "backward", "forward_backward")
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SLACK_BYTES = 1 << 20  # metadata and framing on top of the tensors themselves
# how much of a refused upload is read and dropped so the refusal reaches the caller
_DRAIN_FACTOR, _DRAIN_TIMEOUT_S = 4, 30.0

OptimizerFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]


@dataclass(frozen=True)
class RequestOptions:
    """What a request's metadata asks for, checked."""

    codec: WireCodec = "none"  # the request's: its answer goes back the same way
    seed: int | None = None  # dropout seed: the same masks in a forward and its recomputation
    tag: StepTag | None = None  # the driver's step and attempt, on calls that accumulate
    caller: str = ""  # the calling peer's id


class StageServer:
    """Serves `stage` under `key` on `p2p` until `stop()`; `stats` counts its work."""

    def __init__(
        self,
        p2p: P2P,
        stage: StageModule,
        key: str,
        optimizer_factory: OptimizerFactory,
        accumulate_samples: int,
        *,
        grad_clip: float | None = None,
        lr_at: Callable[[int], float] | None = None,
        max_tokens: int | None = None,
        chunk_bytes: int = WIRE_CHUNK_BYTES,
        admits: Callable[[str], Awaitable[bool]] | None = None,
        on_refused: Callable[[str, str], None] | None = None,
        on_loss: Callable[[float], None] | None = None,
        precision: str = "fp32",
    ) -> None:
        if not _KEY.match(key):
            raise ValueError(f"stage key {key!r} must match {_KEY.pattern}")
        self.p2p, self.key, self.chunk_bytes, self.admits = p2p, key, chunk_bytes, admits
        self.on_refused = on_refused  # (caller's peer id, reason): who sent what we refused
        self.on_loss = on_loss  # each forward_backward's loss (finite: the executor refuses others)
        self.traffic = Traffic()
        self.executor = StageExecutor(
            stage,
            optimizer_factory(stage),
            accumulate_samples,
            grad_clip=grad_clip,
            lr_at=lr_at,
            max_tokens=max_tokens,
            precision=precision,
        )
        cfg = stage.config
        # the largest legitimate request: fp32 inputs (or int64 ids), fp32 grad_outputs, int64 targets
        in_width = 2 if stage.is_first else cfg.d_model
        out_width = cfg.vocab_size if stage.is_last else cfg.d_model
        self.max_request_bytes = self.executor.max_tokens * 4 * (in_width + out_width + 2) + _SLACK_BYTES
        self._registered: list[str] = []

    @property
    def stage(self) -> StageModule:
        return self.executor.stage

    @property
    def stats(self) -> StageStats:
        return self.executor.stats

    async def start(self) -> Self:
        handlers: dict[str, Callable[[list[torch.Tensor], int | None], Awaitable[Payload]]] = {
            "forward": self._forward,
            "backward": self._backward,
            "forward_backward": self._forward_backward,
        }
        for method, run in handlers.items():
            name = handler_name(self.key, method)
            await self.p2p.add_protobuf_handler(
                name, self._handler(method, run), runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
            )
            self._registered.append(name)
        return self

    async def stop(self) -> None:
        """Stop taking requests; a daemon that is already gone has nothing left to remove."""
        for name in self._registered:
            with contextlib.suppress(Exception):
                await self.p2p.remove_protobuf_handler(name, stream_input=True, stream_output=True)
        self._registered.clear()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- one request -------------------------------------------------------------------

    def _handler(
        self, method: str, run: Callable[[list[torch.Tensor], RequestOptions], Awaitable[Payload]]
    ) -> Callable[
        [AsyncIterator[runtime_pb2.ExpertRequest], P2PContext], AsyncIterator[runtime_pb2.ExpertResponse]
    ]:
        async def handle(
            requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
        ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
            codec: WireCodec = "none"
            kinds, answer = REQUEST_KINDS[method], ANSWER_KINDS[method]
            tally = FrameTally() if kinds.mixed else None
            self.stats.in_flight += 1
            try:
                try:
                    caller = context.remote_id.to_base58()
                    if self.admits is not None and not await self.admits(caller):
                        raise RequestRejected("unauthorized", f"peer {caller} is not an admitted worker of this swarm")
                    frames = tally.watch(requests) if tally is not None else requests
                    received = await read_frames(frames, max_bytes=self.max_request_bytes)
                    if received is None:
                        return  # the caller closed the stream before sending anything
                    self.stats.bytes_in += received.wire_bytes
                    wire = received.wire_bytes
                    self.traffic.received(tally.split(kinds) if tally is not None else kinds.whole(wire))
                    if received.key != self.key:
                        raise RequestRejected(
                            "bad_request", f"this handler serves {self.key!r}, not {received.key!r}"
                        )
                    options = _request_options(received.payload.meta, caller)
                    codec = options.codec
                    reply = await run(received.payload.tensors, options)
                    self.traffic.sent({}, nbytes_by_kind(reply.tensors, MessageKinds((), answer)))
                except (RequestRejected, WireError) as err:
                    self.stats.rejected += 1
                    kind = err.kind if isinstance(err, RequestRejected) else "bad_request"
                    message = err.message if isinstance(err, RequestRejected) else str(err)
                    # a superseded attempt is the driver's own retry, not a fault of the peer
                    if self.on_refused is not None and kind != "stale":
                        self.on_refused(context.remote_id.to_base58(), refusal_reason(kind, message))
                    reply = Payload(meta={"error": {"kind": kind, "message": message}})
                    await self._drain(requests)
                for frame in await encode_frames(response_frames(reply, codec, self.chunk_bytes)):
                    self.stats.bytes_out += frame.ByteSize()
                    self.traffic.sent({answer: frame.ByteSize()})
                    yield frame
            finally:
                self.stats.in_flight -= 1

        return handle

    async def _drain(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> None:
        """Read and drop what is left of a refused request before answering.

        Closing a stream the caller is still writing to resets it, and a reset can destroy
        our answer on the way: the caller would see a broken connection, retry on another
        replica, and never learn why. Bounded in bytes and time against a peer that keeps
        sending. A no-op when the request was read to its end.
        """
        budget = _DRAIN_FACTOR * self.max_request_bytes

        async def drain() -> None:
            seen = 0
            async for frame in requests:
                seen += frame.ByteSize()
                if seen > budget:
                    return

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(drain(), _DRAIN_TIMEOUT_S)

    async def _forward(self, tensors: list[torch.Tensor], options: RequestOptions) -> Payload:
        (inputs,) = _expect(tensors, 1, "forward takes [inputs]")
        return Payload([await self.executor.forward(inputs, options.seed)])

    async def _backward(self, tensors: list[torch.Tensor], options: RequestOptions) -> Payload:
        inputs, grad_outputs = _expect(tensors, 2, "backward takes [inputs, grad_outputs]")
        grad_inputs = await self.executor.backward(
            inputs, grad_outputs, options.seed, tag=options.tag, driver=options.caller
        )
        return _gradient_payload(grad_inputs)

    async def _forward_backward(self, tensors: list[torch.Tensor], options: RequestOptions) -> Payload:
        inputs, targets = _expect(tensors, 2, "forward_backward takes [inputs, targets]")
        loss, grad_inputs = await self.executor.forward_backward(
            inputs, targets, options.seed, tag=options.tag, driver=options.caller
        )
        payload = _gradient_payload(grad_inputs)
        payload.meta["loss"] = loss
        if self.on_loss is not None:
            self.on_loss(float(loss))
        return payload


def refusal_reason(kind: str, message: str) -> str:
    """The reason a refused message is reported to the coordinator under (pure)."""
    if kind in ("unauthorized", "outlier"):
        return kind
    return "non_finite" if "finite" in message or "NaN" in message else "malformed"


def _gradient_payload(grad_inputs: torch.Tensor | None) -> Payload:
    # the first stage's inputs are token ids: no gradient, an empty tensor list
    if grad_inputs is None:
        return Payload()
    return Payload([grad_inputs], roles=["gradient"])


def _expect(tensors: list[torch.Tensor], count: int, usage: str) -> list[torch.Tensor]:
    if len(tensors) != count:
        raise RequestRejected("bad_request", f"{usage}; got {len(tensors)} tensors")
    return tensors


def _request_options(meta: dict[str, Any], caller: str) -> RequestOptions:
    seed = meta.get("seed")
    try:
        codec = codec_from_meta(meta)
    except (ValueError, TypeError) as err:
        raise RequestRejected("bad_request", str(err)) from None
    if seed is not None and not _is_u63(seed):
        raise RequestRejected("bad_request", f"seed must be an integer in [0, 2**63) (got {seed!r})")
    step = meta.get("step")
    if step is not None and not (isinstance(step, list) and len(step) == 3 and all(map(_is_u63, step))):
        raise RequestRejected("bad_request", f"step must be [session, step, attempt], integers in [0, 2**63) "
                                             f"(got {str(step)[:80]})")
    return RequestOptions(codec, seed, StepTag(*step) if step is not None else None, caller)


def _is_u63(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63
