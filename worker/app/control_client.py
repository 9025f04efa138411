"""The worker's side of the control plane: find the coordinator, join, heartbeat, leave.

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
import re
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc

from protos import swarmtrain_pb2 as pb
from protos import swarmtrain_pb2_grpc as pb_grpc
from protos.rendezvous import COORDINATORS_KEY, RendezvousRecord, records_from_entry
from worker.telemetry.counters import CounterBook

T = TypeVar("T")

DISCOVERY_TIMEOUT_S = 30.0
DISCOVERY_POLL_S = 0.5
JOIN_TIMEOUT_S = 15.0  # a coordinator that is still starting gets this long to answer
LEAVE_TIMEOUT_S = 2.0  # leaving must not hold up a volunteer's Ctrl-C
CHECKPOINT_CHUNK_BYTES = 192 * 1024  # under the coordinator's 256 KiB message limit
CHECKPOINT_LOAD_TIMEOUT_S = 600.0
BACKOFF_CAP_S = 30.0
DEFAULT_LEASE_S = 300.0  # the schema's default, for a run config without one
UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
USER_MISTAKE = 2  # exit code: the command line must change
UNAVAILABLE_NOW = 1  # exit code: nothing to fix locally; try again later

_CHANNEL_OPTIONS = [
    # The channel's own reconnect backoff grows to minutes by default; ours governs retries.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]

OnAssignment = Callable[[pb.Assignment], Awaitable[None] | None]
OnWaiting = Callable[[str], Awaitable[None] | None]


class CoordinatorError(Exception):
    """A one-line problem for the volunteer; `exit_code` 2 means their command must change."""

    def __init__(self, message: str, exit_code: int = UNAVAILABLE_NOW) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class HeartbeatOutcome(enum.Enum):
    STOPPED = "stopped"  # the caller asked (SIGINT/SIGTERM)
    DRAIN = "drain"  # the coordinator asked this worker to leave
    LEASE_EXPIRED = "lease expired"  # the coordinator stayed unreachable past the lease


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


def choose_run(
    found: dict[str, RendezvousRecord], run_id: str | None, peers: list[str],
    waited_s: float = DISCOVERY_TIMEOUT_S,
) -> tuple[str, RendezvousRecord]:
    """The run to join among those found in the DHT, or a CoordinatorError that says why not."""
    if run_id is not None:
        if run_id in found:
            return run_id, found[run_id]
        others = f" (it lists: {', '.join(sorted(found))})" if found else ""
        raise CoordinatorError(
            f"no coordinator for run {run_id!r} found through --peers {' '.join(peers)}{others}: "
            "check --run-id",
            USER_MISTAKE if found else UNAVAILABLE_NOW,
        )
    if len(found) == 1:
        return next(iter(found.items()))
    if not found:
        raise CoordinatorError(
            f"no coordinator found through --peers {' '.join(peers)} within {waited_s:.0f}s: "
            "is it running? Or pass --coordinator HOST:PORT"
        )
    runs = ", ".join(f"{rid} at {rec.endpoint}" for rid, rec in sorted(found.items()))
    raise CoordinatorError(f"several runs share these peers ({runs}): pass --run-id to pick one",
                           USER_MISTAKE)


def explain_rpc_error(rpc: str, code: grpc.StatusCode, details: str, endpoint: str) -> CoordinatorError:
    """One line a volunteer can act on, for a call the coordinator refused or never answered."""
    details = details.splitlines()[0][:200] if details else code.name.lower()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        details = "no answer in time"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        # banned by its peers' reports, or its join token revoked: restarting as is will not help
        return CoordinatorError(details, USER_MISTAKE)  # "worker w-… was banned after …": says it all
    if code == grpc.StatusCode.UNAUTHENTICATED and details.startswith("join token ") and "revoked" in details:
        return CoordinatorError(f"the coordinator refused the join token: {details}", USER_MISTAKE)
    if code == grpc.StatusCode.UNAUTHENTICATED and "join token" in details:
        what = "requires" if details.startswith("no join token") else "refused"
        return CoordinatorError(
            f"the coordinator {what} the join token: "
            "pass --join-token TOKEN with the token the swarm's operator gave",
            USER_MISTAKE,
        )
    if code == grpc.StatusCode.FAILED_PRECONDITION and rpc == "Join":
        return CoordinatorError(details, USER_MISTAKE)  # a software version the swarm does not run
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        # a Join carries the volunteer's flags (name, memory); later calls only our own counters
        return CoordinatorError(f"the coordinator refused this worker's {rpc}: {details}",
                                USER_MISTAKE if rpc == "Join" else UNAVAILABLE_NOW)
    if code in UNREACHABLE:
        return CoordinatorError(
            f"cannot reach the coordinator at {endpoint} ({details}): "
            "is it running, and is its port open to you?"
        )
    return CoordinatorError(f"{rpc} at {endpoint} failed: {code.name}: {details}")


def explain_dht_error(err: BaseException, peers: list[str]) -> CoordinatorError:
    """hivemind's start-up failures, without the daemon's timestamps."""
    first_line = str(err).splitlines()[0] if str(err) else ""
    text = re.sub(r"^.*?\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\s*", "", first_line)
    hint = "is the coordinator running, and is its DHT port open to you?"
    if "parse multiaddr" in text or "invalid" in text:
        hint = "copy the address the coordinator printed after 'DHT:'"
    problem = text or repr(err)
    return CoordinatorError(f"cannot join the DHT through --peers {' '.join(peers)}: {problem}; {hint}",
                            USER_MISTAKE if "multiaddr" in text else UNAVAILABLE_NOW)


def lease_s_of(run_config_json: str) -> float:
    try:
        return float(json.loads(run_config_json)["coordinator"]["lease_s"])
    except (ValueError, KeyError, TypeError):
        return DEFAULT_LEASE_S


# ---- discovery --------------------------------------------------------------------------


async def discover_coordinator(
    peers: list[str], run_id: str | None, timeout: float = DISCOVERY_TIMEOUT_S
) -> tuple[str, RendezvousRecord]:
    """Join the DHT as a client through `peers` and read the coordinators' rendezvous records.

    Returns (gRPC endpoint, record). Call from the main thread, before any gRPC channel
    exists: the DHT forks a child process.
    """
    import hivemind  # loads in seconds; only swarm mode needs it

    # Ctrl-C reaches the whole process group: the DHT child must leave it to us, or it dies
    # with a traceback of its own. The child inherits the ignored signals; we restore ours.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        dht = hivemind.DHT(initial_peers=peers, client_mode=True, start=True, shutdown_timeout=1)
    except Exception as err:  # noqa: BLE001 - hivemind reports bad peers as bare exceptions
        raise explain_dht_error(err, peers) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    try:
        deadline = time.monotonic() + timeout
        found: dict[str, RendezvousRecord] = {}
        while True:
            # awaited in the loop, not in a thread: a cancelled discovery leaves nothing behind
            lookup = dht.get(COORDINATORS_KEY, latest=True, return_future=True)
            try:
                entry = await asyncio.wait_for(lookup, max(1.0, deadline - time.monotonic()))
                found = records_from_entry(entry)
            except TimeoutError:
                found = {}
            if (found and run_id is None) or run_id in found or time.monotonic() > deadline:
                break
            await asyncio.sleep(DISCOVERY_POLL_S)
        _, record = choose_run(found, run_id, peers, timeout)
        return record.endpoint, record
    finally:
        await asyncio.to_thread(_shutdown_dht, dht)


def _shutdown_dht(dht: Any) -> None:
    dht.shutdown()
    dht.join(timeout=2)
    if dht.is_alive():
        dht.kill()
        dht.join(timeout=2)


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
    ) -> None:
        self.endpoint = endpoint
        self.profile = profile
        self.join_token = join_token
        self.log = log
        self.clock = clock
        self.rng = rng
        if tls:
            self.channel = grpc.aio.secure_channel(endpoint, grpc.ssl_channel_credentials(), _CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.insecure_channel(endpoint, _CHANNEL_OPTIONS)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.worker_id = ""
        self.session_token = ""
        self.run_id = ""
        self.run_config_json = ""
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
        if reply.instruction == pb.INSTRUCTION_DRAIN:
            return HeartbeatOutcome.DRAIN
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
        first = pb.CheckpointFile()
        first.CopyFrom(header)
        first.worker_id, first.session_token = self.worker_id, self.session_token

        def chunks() -> Iterator[pb.CheckpointChunk]:
            yield pb.CheckpointChunk(file=first, data=data[:CHECKPOINT_CHUNK_BYTES])
            for at in range(CHECKPOINT_CHUNK_BYTES, len(data), CHECKPOINT_CHUNK_BYTES):
                yield pb.CheckpointChunk(data=data[at : at + CHECKPOINT_CHUNK_BYTES])

        reply = await self.stub.SaveCheckpoint(chunks(), timeout=transfer_timeout_s(len(data)))
        return reply.complete

    async def load_checkpoint(self, layer_start: int, layer_end: int) -> list[tuple[pb.CheckpointFile, bytes]]:
        """The newest complete checkpoint's files holding layers [layer_start, layer_end); [] if the
        coordinator has none yet."""
        request = pb.LoadCheckpointRequest(worker_id=self.worker_id, session_token=self.session_token,
                                           layer_start=layer_start, layer_end=layer_end)
        files: list[tuple[pb.CheckpointFile, bytes]] = []
        header: pb.CheckpointFile | None = None
        buffer = bytearray()
        try:
            async for chunk in self.stub.LoadCheckpoint(request, timeout=CHECKPOINT_LOAD_TIMEOUT_S):
                if chunk.HasField("file"):
                    if header is not None:
                        files.append((header, _whole(header, buffer)))
                    header, buffer = chunk.file, bytearray()
                elif header is None:
                    raise CoordinatorError("the coordinator sent checkpoint data before naming its file")
                buffer += chunk.data
                if len(buffer) > header.size_bytes:
                    raise CoordinatorError(f"stage {header.stage_index}'s checkpoint file is longer than announced")
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return []
            raise
        if header is not None:
            files.append((header, _whole(header, buffer)))
        return files

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


def _whole(header: pb.CheckpointFile, buffer: bytearray) -> bytes:
    if len(buffer) != header.size_bytes:
        raise CoordinatorError(f"stage {header.stage_index}'s checkpoint file arrived with {len(buffer):,} of "
                               f"{header.size_bytes:,} bytes")
    return bytes(buffer)


def transfer_timeout_s(size_bytes: int) -> float:
    """A deadline for moving a checkpoint file: a minute, plus its size at 1 MB/s."""
    return 60.0 + size_bytes / 1e6


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
