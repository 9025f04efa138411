"""The worker's side of the control plane: join, heartbeat, leave; discovery.py finds the coordinator.

The coordinator may restart or vanish for a while; a worker then keeps its stage and retries
(with capped, jittered backoff) until its lease runs out, and re-registers under the same id
when the coordinator is back. Only a refusal the volunteer must act on (wrong or revoked join
token, wrong software version, a ban) ends the session.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import json
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc

from protos import swarmtrain_pb2 as pb
from protos import swarmtrain_pb2_grpc as pb_grpc
from worker.app.checkpoint_transfer import download_checkpoint, upload_checkpoint
from worker.app.rpc_errors import UNREACHABLE, explain_rpc_error
from worker.telemetry.counters import CounterBook
from worker.telemetry.trace import Trace

T = TypeVar("T")

JOIN_TIMEOUT_S = 15.0  # a coordinator that is still starting gets this long to answer
LEAVE_TIMEOUT_S = 2.0  # leaving must not hold up a volunteer's Ctrl-C
BACKOFF_CAP_S = 30.0
DEFAULT_LEASE_S = 300.0  # the schema's default, for a run config without one

_CHANNEL_OPTIONS = [
    # The channel's own reconnect backoff grows to minutes by default; ours governs retries.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]

OnAssignment = Callable[[pb.Assignment], Awaitable[None] | None]
OnWaiting = Callable[[str], Awaitable[None] | None]


class HeartbeatOutcome(enum.Enum):
    STOPPED = "stopped"  # the caller asked (SIGINT/SIGTERM)
    DRAIN = "drain"  # the coordinator asked this worker to leave
    LEASE_EXPIRED = "lease expired"  # the coordinator stayed unreachable past the lease
    COMPLETE = "complete"  # the run reached its token budget: `status` says where its checkpoint is


# ---- pure decisions ---------------------------------------------------------------------


def backoff_delay(attempt: int, base_s: float, cap_s: float, jitter: float) -> float:
    """Seconds before retry number `attempt` (0-based): doubling from `base_s`, capped at
    `cap_s`, then scaled into [50%, 100%) by `jitter` in [0, 1) so a swarm that lost its
    coordinator at the same moment does not come back in lockstep."""
    raw = min(cap_s, base_s * 2 ** min(attempt, 30))
    return raw * (0.5 + 0.5 * jitter)


def backoff_cap(heartbeat_interval_s: float) -> float:
    """Six heartbeats (within 1..30 s): a returning coordinator hears from us well before it
    would time us out."""
    return min(BACKOFF_CAP_S, max(1.0, 6 * heartbeat_interval_s))


def assignment_changed(old: pb.Assignment | None, new: pb.Assignment) -> bool:
    """Whether `new` asks for different work than `old`; a renewed lease alone is no change."""
    if old is None:
        return True
    a, b = pb.Assignment(), pb.Assignment()
    a.CopyFrom(old)
    b.CopyFrom(new)
    a.lease_expires_unix = b.lease_expires_unix = 0
    return a != b


def unreachable_advice(multiaddrs: list[str] | tuple[str, ...]) -> str:
    """The one line for a volunteer whose data plane the coordinator could not connect to (pure)."""
    return (f"warning: the coordinator could not connect to this worker ({', '.join(multiaddrs) or 'no address'}): "
            "other workers cannot send it work, so it may be given none. Forward a TCP port on your router to "
            "this machine (the same port, e.g. 31330) and restart with --public-addr YOUR_PUBLIC_IP:31330, or "
            "run it where it has a public address")


def lease_s_of(run_config_json: str) -> float:
    try:
        return float(json.loads(run_config_json)["coordinator"]["lease_s"])
    except (ValueError, KeyError, TypeError):
        return DEFAULT_LEASE_S


# ---- the session ------------------------------------------------------------------------


class _Stopped(Exception):
    """The caller's stop event fired while a call was in flight."""


class CoordinatorSession:
    """One worker's conversation with one coordinator endpoint."""

    def __init__(
        self,
        endpoint: str,
        profile: pb.WorkerProfile,
        *,
        join_token: str = "",
        tls: bool = False,
        log: Callable[[str], None] = print,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        trace: Trace | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.profile = profile
        self.join_token = join_token
        self.log = log
        self.clock = clock
        self.rng = rng
        self.trace = trace or Trace()  # --trace: the session's turns, as events beside the lines
        if tls:
            self.channel = grpc.aio.secure_channel(endpoint, grpc.ssl_channel_credentials(), _CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.insecure_channel(endpoint, _CHANNEL_OPTIONS)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.worker_id = ""
        self.session_token = ""
        self.run_id = ""
        self.run_config_json = ""
        self.pretrained_fingerprint = ""  # the coordinator's starting checkpoint, if the run has one
        self.data_url = ""
        self.reachability = pb.REACHABILITY_UNSPECIFIED  # the coordinator's dial-back of our data plane
        self.has_pretrained = False  # worker --pretrained: checkpoint 0 is here already, not to download
        self.assignment: pb.Assignment | None = None
        self.status = ""  # why there is no assignment
        self.heartbeat_interval_s = 5.0
        self.lease_expires_unix = 0.0

    @property
    def rpc_timeout_s(self) -> float:
        return min(10.0, max(1.0, 2 * self.heartbeat_interval_s))

    async def join(self, timeout: float = JOIN_TIMEOUT_S) -> pb.JoinResponse:
        """Register (or re-register with the id and token from an earlier join)."""
        try:
            response = await self._join_rpc(timeout, wait_for_ready=True)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND and self.worker_id:
                self._forget_identity()  # the coordinator lost its memory of us: start afresh
                return await self.join(timeout)
            raise explain_rpc_error("Join", err.code(), err.details() or "", self.endpoint) from None
        self.assignment = _copy(response.assignment) if response.HasField("assignment") else None
        self.status = response.status
        self._renew_lease(response)
        return response

    async def _join_rpc(self, timeout: float, *, wait_for_ready: bool = False) -> pb.JoinResponse:
        """Join and remember who we are; what to do with the assignment is the caller's call."""
        request = pb.JoinRequest(profile=self.profile, join_token=self.join_token,
                                 worker_id=self.worker_id, session_token=self.session_token)
        response = await self.stub.Join(request, timeout=timeout, wait_for_ready=wait_for_ready)
        self.worker_id, self.session_token = response.worker_id, response.session_token
        self.run_id, self.run_config_json = response.run_id, response.run_config_json
        self.pretrained_fingerprint = response.pretrained_fingerprint
        self.data_url = response.data_url  # where to fetch prepared data this machine lacks
        self.heartbeat_interval_s = response.heartbeat_interval_s or self.heartbeat_interval_s
        return response

    def _renew_lease(self, response: pb.JoinResponse) -> None:
        if response.HasField("assignment"):
            self.lease_expires_unix = response.assignment.lease_expires_unix
        else:  # nothing assigned, no lease sent: wait for a stage as long as a lease would last
            self.lease_expires_unix = self.clock() + lease_s_of(response.run_config_json)

    def _forget_identity(self) -> None:
        self.worker_id = self.session_token = ""

    async def run_heartbeats(
        self,
        counters: CounterBook,
        on_assignment: OnAssignment,
        *,
        on_waiting: OnWaiting | None = None,
        stop: asyncio.Event | None = None,
        on_checkpoint: Callable[[pb.CheckpointRequest], None] | None = None,
    ) -> HeartbeatOutcome:
        """Beat every `heartbeat_interval_s` until `stop` is set, the coordinator says DRAIN,
        or it stays unreachable past the lease. Raises CoordinatorError on a refusal."""
        stop = stop or asyncio.Event()
        failures = 0
        rejoin = False
        while not stop.is_set():
            delay = self.heartbeat_interval_s
            try:
                if rejoin:
                    await self._rejoin(stop, on_assignment, on_waiting)
                    rejoin = False
                else:
                    outcome = await self._beat(stop, counters, on_assignment, on_waiting, on_checkpoint)
                    if outcome is not None:
                        return outcome
                if failures:
                    self.log(f"coordinator at {self.endpoint} reachable again; worker {self.worker_id}")
                    self.trace.write("reachable", worker_id=self.worker_id)
                    failures = 0
            except _Stopped:
                break
            except grpc.aio.AioRpcError as err:
                code = err.code()
                if code in UNREACHABLE:
                    if self.clock() >= self.lease_expires_unix:
                        return HeartbeatOutcome.LEASE_EXPIRED
                    delay = backoff_delay(failures, self.heartbeat_interval_s,
                                          backoff_cap(self.heartbeat_interval_s), self.rng())
                    if failures == 0:
                        left = self.lease_expires_unix - self.clock()
                        self.log(f"coordinator at {self.endpoint} unreachable ({code.name.lower()}): keeping "
                                 f"the stage and retrying for up to {left:.0f}s, until the lease ends")
                        self.trace.write("unreachable", worker_id=self.worker_id)
                    failures += 1
                elif code == grpc.StatusCode.NOT_FOUND and not rejoin:
                    self.log(f"the coordinator does not know worker {self.worker_id}: joining afresh")
                    self._forget_identity()
                    rejoin, delay = True, 0.0
                elif code == grpc.StatusCode.NOT_FOUND and rejoin and self.worker_id:
                    self._forget_identity()  # presented an id it no longer has: register anew
                    delay = 0.0
                elif code == grpc.StatusCode.FAILED_PRECONDITION and not rejoin:
                    self.log(f"the coordinator marked worker {self.worker_id} gone: "
                             "re-joining with the same id")
                    self.trace.write("gone", worker_id=self.worker_id)
                    rejoin, delay = True, 0.0
                else:
                    raise explain_rpc_error("Join" if rejoin else "Heartbeat", code, err.details() or "",
                                            self.endpoint) from None
            if delay > 0 and await _stopped_within(stop, delay):
                break
        return HeartbeatOutcome.STOPPED

    async def _beat(
        self, stop: asyncio.Event, counters: CounterBook,
        on_assignment: OnAssignment, on_waiting: OnWaiting | None,
        on_checkpoint: Callable[[pb.CheckpointRequest], None] | None = None,
    ) -> HeartbeatOutcome | None:
        delta = counters.take_delta()
        request = pb.HeartbeatRequest(
            worker_id=self.worker_id, session_token=self.session_token,
            plan_version=self.assignment.plan_version if self.assignment else 0, counters=delta,
            data_progress=counters.data_leases.progress(),
        )
        try:
            reply = await _unless_stopped(stop, self.stub.Heartbeat(request, timeout=self.rpc_timeout_s))
        except BaseException:
            # Unacknowledged: send it again next time. (A reply lost after the coordinator
            # counted it would count twice; a few tokens' progress is the lesser harm.)
            counters.restore(delta)
            raise
        if reply.lease_expires_unix:
            self.lease_expires_unix = reply.lease_expires_unix
        if reply.reachability != self.reachability and reply.reachability != pb.REACHABILITY_UNSPECIFIED:
            self.reachability = reply.reachability
            self.trace.write("dialled_back", reachable=reply.reachability == pb.REACHABILITY_DIRECT)
            if reply.reachability == pb.REACHABILITY_UNREACHABLE:
                self.log(unreachable_advice(self.profile.multiaddrs))
        for span in counters.data_leases.update(reply):  # the coordinator recorded them: trained once
            self.trace.write("data_trained", range=span.range_id, epoch=span.epoch, start=span.start, end=span.end)
        if reply.instruction == pb.INSTRUCTION_DRAIN:
            return HeartbeatOutcome.DRAIN
        if reply.instruction == pb.INSTRUCTION_COMPLETE:
            self.status = reply.status
            return HeartbeatOutcome.COMPLETE
        if reply.HasField("grant"):
            counters.grant_tokens(reply.grant.tokens_left)
        if reply.instruction == pb.INSTRUCTION_REASSIGN and reply.HasField("assignment"):
            await self._adopt(reply.assignment, on_assignment)
        elif reply.status:
            await self._wait_with(reply.status, on_waiting)
        elif reply.HasField("checkpoint") and on_checkpoint is not None:
            on_checkpoint(reply.checkpoint)
        return None

    async def _rejoin(
        self, stop: asyncio.Event, on_assignment: OnAssignment, on_waiting: OnWaiting | None
    ) -> None:
        response = await _unless_stopped(stop, self._join_rpc(self.rpc_timeout_s))
        self.log(f"re-joined as worker {self.worker_id}")
        self.trace.write("rejoined", worker_id=self.worker_id)
        self._renew_lease(response)
        if response.HasField("assignment"):
            await self._adopt(response.assignment, on_assignment)
        else:
            await self._wait_with(response.status, on_waiting)

    async def _adopt(self, assignment: pb.Assignment, on_assignment: OnAssignment) -> None:
        changed = assignment_changed(self.assignment, assignment)
        self.assignment = _copy(assignment)
        self.status = ""
        if assignment.lease_expires_unix:
            self.lease_expires_unix = assignment.lease_expires_unix
        if changed:
            await _call(on_assignment, self.assignment)

    async def _wait_with(self, status: str, on_waiting: OnWaiting | None) -> None:
        """The coordinator has no stage for us (any more): tell the caller once per reason."""
        news = self.assignment is not None or status != self.status
        self.assignment, self.status = None, status
        if news and on_waiting is not None:
            await _call(on_waiting, status)

    # ---- checkpoints --------------------------------------------------------------------

    async def save_checkpoint(self, header: pb.CheckpointFile, data: bytes) -> bool:
        """Upload one stage file of a checkpoint; True if it completed the checkpoint."""
        return await upload_checkpoint(self.stub, header, data, self.worker_id, self.session_token)

    async def load_checkpoint(self, layer_start: int, layer_end: int,
                              folder: Path) -> list[tuple[pb.CheckpointFile, Path]]:
        """The newest complete checkpoint's files holding layers [layer_start, layer_end), written
        into `folder`; [] if the coordinator has none yet."""
        return await download_checkpoint(self.stub, pb.LoadCheckpointRequest(
            worker_id=self.worker_id, session_token=self.session_token,
            layer_start=layer_start, layer_end=layer_end, has_pretrained=self.has_pretrained), folder)

    async def leave(self, reason: str) -> bool:
        """Say goodbye so the stage is re-planned at once; False if the coordinator did not hear."""
        if not self.worker_id:
            return False
        request = pb.LeaveRequest(worker_id=self.worker_id, session_token=self.session_token,
                                  reason=reason[:200])
        try:
            await self.stub.Leave(request, timeout=LEAVE_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return False  # it will time us out instead
        return True

    async def close(self) -> None:
        await self.channel.close()


async def _call(callback: Callable[[T], Awaitable[None] | None], value: T) -> None:
    result = callback(value)
    if inspect.isawaitable(result):
        await result


async def _unless_stopped(stop: asyncio.Event, awaitable: Awaitable[T]) -> T:
    """The awaitable's result, or _Stopped (with the call cancelled) if `stop` fires first."""
    call = asyncio.ensure_future(awaitable)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({call, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        call.cancel()
        raise
    finally:
        waiter.cancel()
    if call.done():
        return call.result()
    call.cancel()
    raise _Stopped


def _copy(assignment: pb.Assignment) -> pb.Assignment:
    copy = pb.Assignment()
    copy.CopyFrom(assignment)
    return copy


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True
