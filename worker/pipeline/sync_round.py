"""Averaging a stage's replicas in rounds that leave every participant with the same parameters.

One replica leads each round: the one whose peer id (base58) sorts first among the live
replicas of the stage, so every replica can tell without talking to the others. The leader

1. calls `sync_begin` on every other replica at once. Each follower takes its executor's lock
   between two optimizer steps (a driving replica finishes the step it is in first), answers
   with a copy of its parameters, and keeps the lock, so it takes no step until the round ends
   or `HOLD_S` passes;
2. under its own lock, averages its parameters with the answers it got and loads the mean;
3. sends that mean (uncompressed, bit for bit) in `sync_commit` to the followers that
   answered, which load it and release their lock.

Everyone who took part ends the round with identical parameters, which `params_digest`
shows. A follower that did not answer in time is left out of the mean and keeps its own
parameters until the next round; one whose leader vanished carries on after `HOLD_S`.
Requests only ever go from a lower peer id to a higher one, so two replicas that briefly
disagree about who leads cannot wait on each other.

This is plain parameter averaging in fp32; the compressed pseudo-gradient round with an
outer Nesterov step replaces the mean with the same message flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from worker.pipeline.errors import PipelineError, RequestRejected, WireError
from worker.pipeline.executor import StageExecutor
from worker.pipeline.replicas import RETRYABLE
from worker.pipeline.route import Replica
from worker.pipeline.stage_client import StageClient
from worker.pipeline.wire import (
    WIRE_CHUNK_BYTES,
    Payload,
    encode_frames,
    handler_name,
    read_frames,
    response_frames,
)

BEGIN, COMMIT = "sync_begin", "sync_commit"
CALL_TIMEOUT_S = 5.0  # per follower and phase: a slow follower is left out, never waited for
HOLD_S = 10.0  # a follower waits this long for the leader's mean before it trains on without it
# A follower that could only pause after this long (its step was still running) lets the round
# go: the leader, waiting CALL_TIMEOUT_S for its answer, has left it out already.
LATE_S = 0.8 * CALL_TIMEOUT_S
_MAX_BEGIN_BYTES = 64 * 1024  # a begin request carries no tensors
_MAX_ROUND_ID = 64


def leads(me: str, others: Sequence[str]) -> bool:
    """Whether the replica with base58 peer id `me` leads rounds among `others` (pure)."""
    return all(me < other for other in others)


def params_digest(tensors: Sequence[torch.Tensor]) -> str:
    """A short fingerprint of parameters' exact fp32 values: equal digests, equal parameters."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class RoundResult:
    """One round as a replica saw it; `digest` is of the parameters it ended with."""

    round_id: str
    leader: bool
    participants: int  # replicas whose parameters went into the mean, this one included
    agreed: int  # replicas that ended the round with the mean, this one included
    left_out: int  # other replicas asked that did not answer in time
    digest: str
    bytes_in: int  # bytes received in this round (the state kind)
    seconds: float
    problems: list[str] = field(default_factory=list)  # why followers were left out, one line each


# ---- the follower -----------------------------------------------------------------------


class _Hold:
    """A follower's part of one round, run in the executor's thread under its lock."""

    def __init__(self, round_id: str, leader: str, stage: torch.nn.Module, loop: asyncio.AbstractEventLoop) -> None:
        self.round_id, self.leader, self.stage, self.loop = round_id, leader, stage, loop
        self.snapshot: asyncio.Future[list[torch.Tensor] | None] = loop.create_future()
        self.mean: list[torch.Tensor] | None = None
        self.committed = threading.Event()
        self.digest = ""
        self.arrived = time.monotonic()

    def run(self) -> bool:
        """Snapshot, then wait for the mean and load it; True if it was loaded."""
        if time.monotonic() - self.arrived > LATE_S:
            self.loop.call_soon_threadsafe(_resolve, self.snapshot, None)
            return False
        copies = [p.detach().to("cpu", torch.float32, copy=True) for p in self.stage.parameters()]
        self.loop.call_soon_threadsafe(_resolve, self.snapshot, copies)
        if not self.committed.wait(HOLD_S) or self.mean is None:
            return False
        with torch.no_grad():
            for p, t in zip(self.stage.parameters(), self.mean, strict=True):
                p.copy_(t.to(p.device, p.dtype))
        self.digest = params_digest(list(self.stage.parameters()))
        return True


def _resolve(future: asyncio.Future[list[torch.Tensor] | None], value: list[torch.Tensor] | None) -> None:
    if not future.done():
        future.set_result(value)


class SyncFollower:
    """Answers the round leader's `sync_begin` and `sync_commit` for the stage under `key`."""

    def __init__(self, p2p: P2P, key: str, stage: torch.nn.Module,
                 executor: Callable[[], StageExecutor | None], step: Callable[[], int],
                 on_round: Callable[[RoundResult], None] | None = None, *,
                 chunk_bytes: int = WIRE_CHUNK_BYTES) -> None:
        self.p2p, self.key, self.stage, self.executor, self.step = p2p, key, stage, executor, step
        self.on_round, self.chunk_bytes = on_round, chunk_bytes
        self.me = p2p.peer_id.to_base58()
        self.bytes_out = self.bytes_in = 0
        self._hold: _Hold | None = None
        self._task: asyncio.Task[bool] | None = None
        self._begun_at = 0.0
        self._names: list[str] = []

    async def start(self) -> SyncFollower:
        # a commit carries our own parameters in fp32, plus framing
        commit_bytes = sum(p.numel() for p in self.stage.parameters()) * 4 + (1 << 20)
        for method, handle, max_bytes in ((BEGIN, self._begin, _MAX_BEGIN_BYTES), (COMMIT, self._commit, commit_bytes)):
            name = handler_name(self.key, method)
            await self.p2p.add_protobuf_handler(name, self._serve(handle, max_bytes), runtime_pb2.ExpertRequest,
                                                stream_input=True, stream_output=True)
            self._names.append(name)
        return self

    async def stop(self) -> None:
        names, self._names = self._names, []
        for name in names:
            with contextlib.suppress(Exception):
                await self.p2p.remove_protobuf_handler(name, stream_input=True, stream_output=True)
        if self._hold is not None:
            self._hold.committed.set()  # let the executor's thread go now
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task

    def _serve(self, handle: Callable[[Payload, str], Awaitable[Payload]], max_bytes: int):
        """A hivemind stream handler around `handle`: one request in, one reply (or refusal) out."""
        async def serve(requests: AsyncIterator[runtime_pb2.ExpertRequest],
                        context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
            try:
                received = await read_frames(requests, max_bytes=max_bytes)
                if received is None:
                    return
                self.bytes_in += received.wire_bytes
                if received.key != self.key:
                    raise RequestRejected("bad_request", f"this handler serves {self.key!r}, not {received.key!r}")
                reply = await handle(received.payload, context.remote_id.to_base58())
            except (RequestRejected, WireError) as err:
                kind = err.kind if isinstance(err, RequestRejected) else "bad_request"
                message = err.message if isinstance(err, RequestRejected) else str(err)
                reply = Payload(meta={"error": {"kind": kind, "message": message}})
            for frame in await encode_frames(response_frames(reply, "none", self.chunk_bytes)):
                self.bytes_out += frame.ByteSize()
                yield frame
        return serve

    async def _begin(self, request: Payload, leader: str) -> Payload:
        round_id = _round_id(request)
        if not leads(leader, [self.me]):
            raise RequestRejected("bad_request", f"peer {leader[-8:]} does not lead rounds for {self.me[-8:]}")
        executor = self.executor()
        if executor is None:
            raise RequestRejected("unavailable", "this stage is not computing yet")
        if self._task is not None and not self._task.done():
            raise RequestRejected("busy", "in another round already")
        hold = _Hold(round_id, leader, self.stage, asyncio.get_running_loop())
        self._hold, self._begun_at = hold, time.perf_counter()
        self._task = asyncio.create_task(executor.exclusive(hold.run))
        self._task.add_done_callback(lambda _: self._finish(hold))
        snapshot = await hold.snapshot
        if snapshot is None:
            raise RequestRejected("busy", f"a step ran for over {LATE_S:.0f}s before this replica could pause")
        return Payload(snapshot, meta={"round": round_id, "step": int(self.step())})

    async def _commit(self, request: Payload, leader: str) -> Payload:
        round_id = _round_id(request)
        hold, task = self._hold, self._task
        if hold is None or task is None or hold.round_id != round_id or hold.leader != leader:
            raise RequestRejected("bad_request", f"no round {round_id!r} open with this peer")
        if task.done():
            raise RequestRejected("expired", f"round {round_id!r} expired after {HOLD_S:.0f}s")
        params = list(self.stage.parameters())
        if len(request.tensors) != len(params) or any(
                t.shape != p.shape or not t.is_floating_point() for t, p in zip(request.tensors, params, strict=True)):
            hold.committed.set()  # release at once: a bad mean is never loaded
            raise RequestRejected("bad_request", "the mean does not match this stage's parameters")
        hold.mean = request.tensors
        hold.committed.set()
        loaded = await task
        return Payload(meta={"round": round_id, "loaded": loaded, "digest": hold.digest})

    def _finish(self, hold: _Hold) -> None:
        if self._hold is hold:
            self._hold = None
        if hold.digest and self.on_round is not None:
            self.on_round(RoundResult(hold.round_id, False, 0, 0, 0, hold.digest, 0,
                                      time.perf_counter() - self._begun_at))


def _round_id(request: Payload) -> str:
    round_id = request.meta.get("round")
    if not isinstance(round_id, str) or not 0 < len(round_id) <= _MAX_ROUND_ID or not round_id.isprintable():
        raise RequestRejected("bad_request", f"round id must be 1..{_MAX_ROUND_ID} printable characters")
    return round_id


# ---- the leader -------------------------------------------------------------------------


async def lead_round(client: StageClient, followers: Sequence[Replica], key: str, stage: torch.nn.Module,
                     executor: StageExecutor | None, *, timeout: float = CALL_TIMEOUT_S) -> RoundResult:
    """Run one round with `followers` (the other live replicas of our stage) and report it."""
    started = time.perf_counter()
    round_id = uuid.uuid4().hex
    params = list(stage.parameters())
    before = client.stats.bytes_in

    problems: list[str] = []

    async def begin(replica: Replica) -> tuple[Replica, list[torch.Tensor]] | None:
        client.add_addresses(replica.peer_id, replica.maddrs)
        try:
            reply = await client.call(replica.peer_id, key, BEGIN, Payload(meta={"round": round_id}), "none", timeout)
        except (PipelineError, *RETRYABLE) as err:
            problems.append(_why(err))
            return None
        if len(reply.tensors) != len(params) or any(
                t.shape != p.shape for t, p in zip(reply.tensors, params, strict=True)):
            problems.append(f"{replica.peer_id.to_base58()[-8:]} answered with parameters of other shapes")
            return None  # it holds for HOLD_S, then trains on: never load a stranger's shapes
        return replica, reply.tensors

    answered = [a for a in await asyncio.gather(*(begin(r) for r in followers)) if a is not None]

    def mean_in_place() -> tuple[list[torch.Tensor], str]:
        with torch.no_grad():
            means = []
            for i, p in enumerate(stage.parameters()):
                total = p.detach().to("cpu", torch.float32, copy=True)
                for _, tensors in answered:
                    total.add_(tensors[i].to(torch.float32))
                mean = total.div_(len(answered) + 1)
                p.copy_(mean.to(p.device, p.dtype))
                means.append(mean)
            # read back under the lock: the stage may step again as soon as it is released
            return means, params_digest(list(stage.parameters()))

    if not answered:
        return RoundResult(round_id, True, 1, 1, len(followers), params_digest(params),
                           client.stats.bytes_in - before, time.perf_counter() - started, problems)
    means, digest = await (executor.exclusive(mean_in_place) if executor is not None
                           else asyncio.to_thread(mean_in_place))

    async def commit(replica: Replica) -> bool:
        try:
            reply = await client.call(replica.peer_id, key, COMMIT, Payload(list(means), meta={"round": round_id}),
                                      "none", timeout)
        except (PipelineError, *RETRYABLE) as err:
            problems.append(_why(err))
            return False
        return reply.meta.get("loaded") is True

    committed = sum(await asyncio.gather(*(commit(r) for r, _ in answered)))
    return RoundResult(round_id, True, 1 + len(answered), 1 + committed, len(followers) - len(answered), digest,
                       client.stats.bytes_in - before, time.perf_counter() - started, problems)


def _why(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


__all__ = ["BEGIN", "COMMIT", "RoundResult", "SyncFollower", "lead_round", "leads", "params_digest"]
