"""The follower's side of an averaging round (worker.replicas.sync_round): answering the leader's
`sync_begin` with our pseudo-gradient, and loading its `sync_commit` under the executor's lock.

A round stays open here from its begin until its commit is loaded, or for `HOLD_S` (plus the
time the round's bulk takes at the pacer's rate) if the commit never comes. An outcome that
moves the stage further than an honest round can is refused as `outlier`, and its leader
reported; one from a leader behind us (`stale`) would roll us back and is refused too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from worker.compression import CodecError, Encoded
from worker.pipeline.errors import RequestRejected, WireError
from worker.pipeline.executor import StageExecutor
from worker.pipeline.pacing import Pacer, frame_bytes, paced
from worker.pipeline.stage_server import refusal_reason
from worker.pipeline.wire import (
    WIRE_CHUNK_BYTES,
    Payload,
    encode_frames,
    handler_name,
    read_frames,
    response_frames,
)
from worker.replicas.diloco import ReplicaSync, implausible_outcome, pack, unpack
from worker.replicas.sync_round import (
    BEGIN,
    COMMIT,
    HOLD_S,
    LATE_S,
    RoundResult,
    bulk_seconds,
    leads,
    params_digest,
)

_MAX_BEGIN_BYTES = 64 * 1024  # a begin request carries no tensors
_MAX_ROUND_ID = 64


class _Hold:
    """A follower's part of one round; `take` and `load` run in the executor's thread under its lock."""

    def __init__(self, round_id: str, leader: str, stage: torch.nn.Module, sync: ReplicaSync) -> None:
        self.round_id, self.leader, self.stage, self.sync = round_id, leader, stage, sync
        self.before: list[torch.Tensor] = []  # the parameters the pseudo-gradient was taken from
        self.answer: Payload | None = None  # our begin answer, for a leader that asks again
        self.commit: tuple[str, list[Encoded] | list[torch.Tensor], int] | None = None
        self.digest = ""
        self.problem = ""
        self.suspect = False  # the outcome was refused as implausible: the leader is reported
        self.moved_norm = 0.0  # our yardstick: how far our pseudo-gradient says we moved
        self.arrived = time.monotonic()

    def take(self) -> tuple[list[Encoded], int] | None:
        """Our pseudo-gradient and anchor round, or None when the lock came too late for the leader."""
        if time.monotonic() - self.arrived > LATE_S:
            return None
        params = list(self.stage.parameters())
        gradient = self.sync.pseudo_gradient(params)
        self.moved_norm = self.sync.moved_norm
        self.before = [p.detach().to("cpu", torch.float32, copy=True) for p in params]
        return gradient, self.sync.round

    def load(self) -> bool:
        """Move to the round's anchor, keeping what the stage trained since `take`; True if loaded,
        False if the outcome does not fit (`problem` says why) or the round was closed meanwhile."""
        assert self.commit is not None
        before = self.before  # read once: closing the round (on the loop) empties the attribute
        if not before:  # closed while this waited for the lock: the replica is leaving its stage
            return False
        kind, body, round_number = self.commit
        try:
            if kind == "update":
                proposed = self.sync.propose(body)  # type: ignore[arg-type]
            else:
                proposed = [t.to(torch.float32) for t in body]  # type: ignore[union-attr]
        except CodecError as err:
            self.problem = str(err)
            return False
        missed = round_number - self.sync.round if kind == "full" else 1  # a whole anchor spans them all
        doubt = implausible_outcome(self.sync.anchor, proposed, self.moved_norm, self.sync.settings, missed)
        if doubt is not None:  # a lying leader's: keep our anchor and parameters, and say so
            self.problem, self.suspect = doubt, True
            self.digest = params_digest(self.sync.anchor)  # the anchor we stay on
            return False
        if kind == "update":
            new = self.sync.accept(proposed, round_number)
        else:
            self.sync.reset(proposed, round_number)
            new = proposed
        with torch.no_grad():
            for p, anchor, then in zip(self.stage.parameters(), new, before, strict=True):
                now = p.detach().to("cpu", torch.float32)
                # untouched since `take`: exactly the anchor (adding a zero drift could flip a -0.0)
                value = anchor if torch.equal(now, then) else anchor + (now - then)
                p.copy_(value.to(p.device, p.dtype))
        self.before = []
        self.digest = params_digest(self.sync.anchor)
        return True


class SyncFollower:
    """Answers the round leader's `sync_begin` and `sync_commit` for the stage under `key`."""

    def __init__(self, p2p: P2P, key: str, stage: torch.nn.Module, sync: ReplicaSync,
                 executor: Callable[[], StageExecutor | None], step: Callable[[], int],
                 on_round: Callable[[RoundResult], None] | None = None, *,
                 chunk_bytes: int = WIRE_CHUNK_BYTES, admits: Callable[[str], Awaitable[bool]] | None = None,
                 on_refused: Callable[[str, str], None] | None = None, pacer: Pacer | None = None,
                 follows: Callable[[str], bool] | None = None) -> None:
        self.pacer = pacer  # paces our pseudo-gradients, the bulk we send (worker.pipeline.pacing)
        self.follows = follows  # whether we follow this leader now (worker.replicas.leadership)
        self.leading = False  # set while this replica leads a round of its own: it follows none meanwhile
        self.p2p, self.key, self.stage, self.sync, self.executor, self.step = p2p, key, stage, sync, executor, step
        self.on_round, self.chunk_bytes, self.admits, self.on_refused = on_round, chunk_bytes, admits, on_refused
        self.me = p2p.peer_id.to_base58()
        self.bytes_out = self.bytes_in = 0
        self._hold: _Hold | None = None  # the open round, from its begin until its commit is loaded
        self._expiry: asyncio.TimerHandle | None = None  # drops the open round after HOLD_S
        self._begun_at = 0.0
        self._expired = ""  # the last round dropped for want of a commit: a late commit is not a bad one
        self._names: list[str] = []

    @property
    def holding(self) -> bool:
        """Whether a round led by another replica is open here."""
        return self._hold is not None

    async def start(self) -> SyncFollower:
        # a commit carries our own parameters in fp32, plus framing
        commit_bytes = sum(p.numel() for p in self.stage.parameters()) * 4 + (1 << 20)
        for method, handle, max_bytes, pacer in ((BEGIN, self._begin, _MAX_BEGIN_BYTES, self.pacer),
                                                 (COMMIT, self._commit, commit_bytes, None)):
            name = handler_name(self.key, method)
            await self.p2p.add_protobuf_handler(name, self._serve(handle, max_bytes, pacer), runtime_pb2.ExpertRequest,
                                                stream_input=True, stream_output=True)
            self._names.append(name)
        return self

    async def stop(self) -> None:
        names, self._names = self._names, []
        for name in names:
            with contextlib.suppress(Exception):
                await self.p2p.remove_protobuf_handler(name, stream_input=True, stream_output=True)
        if self._hold is not None:
            self._drop(self._hold)

    def _serve(self, handle: Callable[[Payload, str], Awaitable[Payload]], max_bytes: int, pacer: Pacer | None):
        """A hivemind stream handler around `handle`: one request in, one reply (or refusal) out,
        sent at `pacer`'s rate when there is one."""
        async def serve(requests: AsyncIterator[runtime_pb2.ExpertRequest],
                        context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
            try:
                caller = context.remote_id.to_base58()
                if self.admits is not None and not await self.admits(caller):
                    raise RequestRejected("unauthorized", f"peer {caller} is not an admitted worker of this swarm")
                received = await read_frames(requests, max_bytes=max_bytes)
                if received is None:
                    return
                self.bytes_in += received.wire_bytes
                if received.key != self.key:
                    raise RequestRejected("bad_request", f"this handler serves {self.key!r}, not {received.key!r}")
                reply = await handle(received.payload, caller)
            except (RequestRejected, WireError) as err:
                kind = err.kind if isinstance(err, RequestRejected) else "bad_request"
                message = err.message if isinstance(err, RequestRejected) else str(err)
                reply = Payload(meta={"error": {"kind": kind, "message": message}})
                if self.on_refused is not None and kind in ("bad_request", "unauthorized", "outlier"):
                    self.on_refused(context.remote_id.to_base58(), refusal_reason(kind, message))
            frames = await encode_frames(response_frames(reply, "none", frame_bytes(pacer, self.chunk_bytes)))
            async for frame in paced(frames, pacer):
                self.bytes_out += frame.ByteSize()
                yield frame
        return serve

    async def _begin(self, request: Payload, leader: str) -> Payload:
        round_id = _round_id(request)
        if not leads(leader, [self.me]):
            raise RequestRejected("bad_request", f"peer {leader[-8:]} does not lead rounds for {self.me[-8:]}")
        if self.follows is not None and not self.follows(leader):
            raise RequestRejected("busy", "this replica follows a lower replica's rounds")
        if self.leading:
            raise RequestRejected("busy", "this replica is leading a round of its own")
        executor = self.executor()
        if executor is None:
            raise RequestRejected("unavailable", "this stage is not computing yet")
        repeated = self._hold
        if repeated is not None:
            if (repeated.round_id, repeated.leader) == (round_id, leader) and repeated.answer is not None \
                    and repeated.commit is None:
                return repeated.answer  # the leader asks again: our answer did not reach it whole
            raise RequestRejected("busy", "in another round already")
        hold = _Hold(round_id, leader, self.stage, self.sync)
        self._hold, self._begun_at = hold, time.perf_counter()
        try:
            snapshot = await executor.exclusive(hold.take)
        except BaseException:  # a failed take, or the stream went away: the round must not stay open
            self._drop(hold)
            raise
        if snapshot is None:
            self._drop(hold)
            raise RequestRejected("busy", f"a step ran for over {LATE_S:.0f}s before this replica could pause")
        # the leader's mean comes after our paced pseudo-gradient and before its paced update
        hold_s = HOLD_S + 2 * bulk_seconds(self.stage, self.pacer)
        self._expiry = asyncio.get_running_loop().call_later(hold_s, self._expire, hold)
        gradient, anchor_round = snapshot
        parts, metas = pack(gradient)
        hold.answer = Payload(parts, meta={"round": round_id, "step": int(self.step()), "anchor_round": anchor_round,
                                           "encoded": metas}, roles=["raw"] * len(parts))
        return hold.answer

    async def _commit(self, request: Payload, leader: str) -> Payload:
        round_id = _round_id(request)
        hold = self._hold
        if hold is None and round_id == self._expired:
            raise RequestRejected("expired", f"round {round_id!r} expired after {HOLD_S:.0f}s")
        if hold is None or hold.round_id != round_id or hold.leader != leader or not hold.before:
            raise RequestRejected("bad_request", f"no round {round_id!r} open with this peer")
        if hold.commit is not None:
            raise RequestRejected("busy", f"round {round_id!r} is being loaded already")
        executor = self.executor()
        if executor is None:
            self._drop(hold)
            raise RequestRejected("unavailable", "this stage is not computing any more")
        try:
            hold.commit = self._outcome(request)
        except CodecError as err:
            self._drop(hold)  # a bad outcome is never loaded
            raise RequestRejected("bad_request", f"the round's outcome does not fit this stage: {err}") from None
        except RequestRejected:
            self._drop(hold)  # nor is a stale one
            raise
        if self._expiry is not None:
            self._expiry.cancel()  # loading now: the round no longer expires
        try:
            loaded = await executor.exclusive(hold.load)
        finally:
            self._drop(hold)
        if not loaded and not hold.problem:
            raise RequestRejected("unavailable", "this replica left the round: its stage is stopping")
        if not loaded and hold.suspect:
            if self.on_round is not None:  # the worker's trace and log say whose outcome was refused
                why = f"refused the outcome of a round led by {leader[-8:]}: {hold.problem}"
                self.on_round(RoundResult(hold.round_id, False, 0, 0, 0, hold.digest, 0,
                                          time.perf_counter() - self._begun_at, [why], refused=1))
            raise RequestRejected("outlier", f"refused the round's outcome: {hold.problem}")
        if not loaded:
            raise RequestRejected("bad_request", f"the round's outcome does not fit this stage: {hold.problem}")
        if self.on_round is not None:
            self.on_round(RoundResult(hold.round_id, False, 0, 0, 0, hold.digest, 0,
                                      time.perf_counter() - self._begun_at))
        return Payload(meta={"round": round_id, "loaded": loaded, "digest": hold.digest})

    def _outcome(self, request: Payload) -> tuple[str, list[Encoded] | list[torch.Tensor], int]:
        """('update', encoded update, round) or ('full', anchor tensors, round), checked against our stage."""
        params = list(self.stage.parameters())
        kind, round_number = request.meta.get("kind"), request.meta.get("anchor_round")
        if not isinstance(round_number, int) or isinstance(round_number, bool) or round_number < 1:
            raise CodecError(f"anchor round {round_number!r}")
        if kind == "update":
            return kind, unpack(request.tensors, request.meta.get("encoded"), len(params)), round_number
        if kind == "full":
            if round_number <= self.sync.round:  # a leader behind us: it must catch up, not roll us back
                raise RequestRejected("stale", f"anchor round {round_number} is not newer than ours ({self.sync.round})")
            if len(request.tensors) != len(params) or any(
                    t.shape != p.shape or not t.is_floating_point()
                    for t, p in zip(request.tensors, params, strict=True)):
                raise CodecError("the anchor does not match this stage's parameters")
            return kind, request.tensors, round_number
        raise CodecError(f"unknown outcome {kind!r}")

    def _expire(self, hold: _Hold) -> None:
        if self._hold is hold:
            self._expired = hold.round_id
        self._drop(hold)

    def _drop(self, hold: _Hold) -> None:
        """Close `hold` if it is the open round (expired, refused, loaded, or stopping)."""
        if self._hold is hold:
            self._hold = None
            if self._expiry is not None:
                self._expiry.cancel()
                self._expiry = None
        hold.before, hold.answer = [], None


def _round_id(request: Payload) -> str:
    round_id = request.meta.get("round")
    if not isinstance(round_id, str) or not 0 < len(round_id) <= _MAX_ROUND_ID or not round_id.isprintable():
        raise RequestRejected("bad_request", f"round id must be 1..{_MAX_ROUND_ID} printable characters")
    return round_id


__all__ = ["SyncFollower"]
