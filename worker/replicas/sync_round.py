"""Rounds among a stage's replicas that leave every participant on the same anchor.

One replica leads each round: the one whose peer id (base58) sorts first among the live
replicas of the stage, so every replica can tell without talking to the others (unless it
starts no rounds: then the next one stands in, worker.replicas.leadership). The leader

1. calls `sync_begin` on every other replica at once. Each follower takes its executor's lock
   between two optimizer steps (a driving replica finishes the step it is in first), takes its
   compressed pseudo-gradient and a copy of the parameters it came from, releases the lock and
   answers with the pseudo-gradient and its anchor's round (worker.replicas.diloco);
2. under its own lock, averages its own pseudo-gradient with those on its anchor, takes the
   outer step, and moves to the new anchor;
3. sends the compressed outer update in `sync_commit` to the followers on its anchor, and the
   new anchor whole to those on an older one. Each loads it under its lock, keeping what it
   trained since its pseudo-gradient: parameters = new anchor + (parameters now - the copy);
   unless the outcome moves the stage further than an honest round can
   (`diloco.implausible_outcome`): then it keeps its anchor and parameters, refuses the
   commit as `outlier`, and reports the leader.

No replica pauses for the network: a round costs the stage two short holds of the lock (a
DiLoCo round overlapped with the next inner steps, whose progress lands on the new anchor
and goes into the next round's pseudo-gradient). Everyone who took part ends the round on
the same anchor, which `params_digest` of the anchor shows; a replica that did not train
meanwhile ends it with exactly the anchor's parameters. A follower that did not answer in
time keeps training and catches up at the next round; one whose leader vanished drops the
round after `HOLD_S`. Requests only ever go from a lower peer id to a higher one, so two
replicas that briefly disagree about who leads cannot wait on each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from worker.compression import CodecError, Encoded
from worker.replicas.diloco import ReplicaSync, implausible_outcome, pack, unpack
from worker.pipeline.errors import BadResponse, NoAnswer, PipelineError, RequestRejected, WireError
from worker.pipeline.executor import StageExecutor
from worker.pipeline.pacing import Pacer, frame_bytes, paced
from worker.pipeline.failover import RETRYABLE
from worker.pipeline.route import Replica
from worker.pipeline.stage_client import StageClient
from worker.pipeline.stage_server import refusal_reason
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
BEGIN_RETRIES = 1  # a follower's answer that arrived malformed, or not at all, is asked for once more
HOLD_S = 10.0  # a follower keeps an open round this long for the leader's mean, then drops it
# A follower that could only take its pseudo-gradient after this long (its step was still
# running) lets the round go: the leader, waiting CALL_TIMEOUT_S for its answer, has left it out.
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
    """One round as a replica saw it; `digest` is of the anchor it ended with."""

    round_id: str
    leader: bool
    participants: int  # replicas whose parameters went into the mean, this one included
    agreed: int  # replicas that ended the round with the mean, this one included
    left_out: int  # other replicas asked that did not answer in time
    digest: str
    bytes_in: int  # bytes received in this round (the state kind)
    seconds: float
    problems: list[str] = field(default_factory=list)  # why followers were left out, one line each
    outliers: list[str] = field(default_factory=list)  # peers whose pseudo-gradient the robust aggregate clipped hard
    refused: int = 0  # replicas that refused the outcome: this follower (1), or the leader's followers
    newer: str = ""  # a leader's: the peer id of a follower on a newer anchor than ours (we are behind)


# ---- the follower -----------------------------------------------------------------------


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
        hold_s = HOLD_S + 2 * _bulk_seconds(self.stage, self.pacer)
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


# ---- the leader -------------------------------------------------------------------------


async def lead_round(client: StageClient, followers: Sequence[Replica], key: str, stage: torch.nn.Module,
                     executor: StageExecutor | None, sync: ReplicaSync, *,
                     timeout: float = CALL_TIMEOUT_S, pacer: Pacer | None = None) -> RoundResult:
    """Run one round with `followers` (the other live replicas of our stage) and report it; the
    updates go out at `pacer`'s rate when there is one (worker.pipeline.pacing)."""
    started = time.perf_counter()
    round_id = uuid.uuid4().hex
    count = len(list(stage.parameters()))
    timeout += _bulk_seconds(stage, pacer)  # a paced pseudo-gradient or update takes its time
    before = client.stats.bytes_in
    problems: list[str] = []

    async def begin(replica: Replica) -> tuple[Replica, int, list[Encoded]] | None:
        client.add_addresses(replica.peer_id, replica.maddrs)
        for attempt in range(1 + BEGIN_RETRIES):
            try:
                reply = await client.call(replica.peer_id, key, BEGIN, Payload(meta={"round": round_id}), "none",
                                          timeout)
                anchor_round = reply.meta.get("anchor_round")
                if not isinstance(anchor_round, int) or isinstance(anchor_round, bool) or anchor_round < 0:
                    raise CodecError(f"anchor round {anchor_round!r}")
                return replica, anchor_round, unpack(reply.tensors, reply.meta.get("encoded"), count)
            except (BadResponse, NoAnswer) as err:
                if attempt < BEGIN_RETRIES:
                    # an answer cut short on the way, or a stream that broke before the request
                    # reached the follower (seen on 2 busy cores): asking again is safe, since a
                    # follower answers a repeated begin with the pseudo-gradient it already took
                    continue
                problems.append(_why(err))
            except (PipelineError, CodecError, *RETRYABLE) as err:
                problems.append(_why(err))
                break
        return None  # it drops the round after HOLD_S; it rejoins at the next round

    answered = [a for a in await asyncio.gather(*(begin(r) for r in followers)) if a is not None]
    ahead = max(answered, key=lambda a: a[1], default=None)
    if ahead is not None and ahead[1] > sync.round:
        # the stage averaged without us (we stalled, or were away): our anchor is stale, and an
        # outcome from it would roll the others back. Nobody moves; we catch up from `ahead`.
        problems.append(f"behind the stage's anchor: round {sync.round}, peer {ahead[0].peer_id.to_base58()[-8:]} "
                        f"is at {ahead[1]}")
        return RoundResult(round_id, True, 1, 1, len(followers) - len(answered), params_digest(sync.anchor),
                           client.stats.bytes_in - before, time.perf_counter() - started, problems,
                           newer=ahead[0].peer_id.to_base58())
    on_anchor = [a for a in answered if a[1] == sync.round]
    outliers: list[str] = []

    def step_in_place() -> tuple[list[Encoded], list[torch.Tensor], list[torch.Tensor], str]:
        own = sync.pseudo_gradient(list(stage.parameters()), own=True)
        update = sync.outer_update([own, *(gradient for _, _, gradient in on_anchor)],
                                   stage_replicas=len(followers) + 1)
        senders = ["self", *(replica.peer_id.to_base58() for replica, _, _ in on_anchor)]
        outliers.extend(senders[i] for i in sync.outliers)
        old = sync.anchor  # apply replaces the list, never its tensors
        new = sync.apply(update, sync.round + 1)
        with torch.no_grad():
            for p, t in zip(stage.parameters(), new, strict=True):
                p.copy_(t.to(p.device, p.dtype))
        return update, new, old, params_digest(sync.anchor)

    if not answered:
        return RoundResult(round_id, True, 1, 1, len(followers), params_digest(sync.anchor),
                           client.stats.bytes_in - before, time.perf_counter() - started, problems)
    try:
        update, new, old, digest = await (executor.exclusive(step_in_place) if executor is not None
                                          else asyncio.to_thread(step_in_place))
    except CodecError as err:  # a follower's pseudo-gradient that does not decode: nobody moves
        problems.append(_why(err))
        return RoundResult(round_id, True, 1, 1, len(followers), params_digest(sync.anchor),
                           client.stats.bytes_in - before, time.perf_counter() - started, problems)
    update, new = sync.outgoing(update, new, old)
    parts, metas = pack(update)
    on_anchor_ids = {r.peer_id for r, _, _ in on_anchor}
    refused: list[str] = []  # followers that judged our outcome implausible

    async def commit(replica: Replica) -> bool:
        if replica.peer_id in on_anchor_ids:
            payload = Payload(list(parts), meta={"round": round_id, "kind": "update", "anchor_round": sync.round,
                                                 "encoded": metas}, roles=["raw"] * len(parts))
        else:  # on an older anchor: it gets the new one whole, once
            payload = Payload([t.clone() for t in new], meta={"round": round_id, "kind": "full",
                                                               "anchor_round": sync.round}, roles=["raw"] * len(new))
        try:
            reply = await client.call(replica.peer_id, key, COMMIT, payload, "none", timeout, pacer=pacer)
        except (PipelineError, *RETRYABLE) as err:
            problems.append(_why(err))
            if isinstance(err, RequestRejected) and err.kind == "outlier":
                refused.append(replica.peer_id.to_base58())
            return False
        return reply.meta.get("loaded") is True

    committed = sum(await asyncio.gather(*(commit(r) for r, _, _ in answered)))
    return RoundResult(round_id, True, 1 + len(on_anchor), 1 + committed, len(followers) - len(answered), digest,
                       client.stats.bytes_in - before, time.perf_counter() - started, problems, outliers,
                       len(refused))


def _bulk_seconds(stage: torch.nn.Module, pacer: Pacer | None) -> float:
    """How long the stage's parameters in fp32 (the most a round sends one way) take at `pacer`'s rate."""
    if pacer is None:
        return 0.0
    return 4 * sum(p.numel() for p in stage.parameters()) / pacer.bytes_per_s


def _why(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


__all__ = ["BEGIN", "COMMIT", "RoundResult", "SyncFollower", "lead_round", "leads", "params_digest"]
