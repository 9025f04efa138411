"""A stage's state over P2P: served for download, fetched to join a stage or to average replicas.

`StateServer` answers `swarmtrain.pipeline.{key}.state` with the stage's parameters, in
`parameters()` order and uncompressed (codec "none"), and its local optimizer step in the
metadata. The snapshot is taken under the executor's lock, so it never sees a half-applied
optimizer step. Every stage serves it, the first stage too.

`fetch_state` downloads one replica's state: a worker that joins a stage which already has
live replicas starts from it rather than from the seed. `fetch_served_state` waits a while for
a replica that does not serve the state yet: the coordinator lists a replica from its
assignment on, and a replica serves only once it has (re)started its role, which it does at
every assignment to other work (a new stage or span). The replica's heartbeats say whether it
serves (`Counters.serves_state`, from its StateServer's start to its role's end), and GetSwarm
passes that on, so a joiner asks those first (worker.runtime.state_download). Averaging the
replicas of a stage is worker.replicas.sync_round's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from worker.pipeline.errors import BadResponse, RequestRejected, WireError
from worker.pipeline.executor import StageExecutor
from worker.pipeline.failover import not_serving_yet
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
from worker.replicas.diloco import ReplicaSync

STATE_METHOD = "state"
FETCH_TIMEOUT_S = 2.0  # per replica in an averaging round: never stall training for longer
SERVED_POLL_S = 0.5  # how often a replica that does not serve its state yet is asked again
_MAX_STATE_REQUEST_BYTES = 64 * 1024  # a state request carries no tensors


@dataclass
class StageState:
    """A replica's parameters (in `parameters()` order), its local optimizer step, and the round of
    the stage's averaging they come from (worker.replicas.diloco: the anchor, when it has one)."""

    tensors: list[torch.Tensor]
    step: int
    wire_bytes: int
    round: int = 0


@dataclass
class SyncStats:
    served: int = 0  # state requests answered
    bytes_out: int = 0
    rounds: int = 0  # averaging rounds that loaded an average
    bytes_in: int = 0  # state bytes received, downloads and rounds


class StateServer:
    """Serves the parameters of a stage under `key`; `executor()` is its current executor, if any."""

    def __init__(self, p2p: P2P, key: str, stage: torch.nn.Module,
                 executor: Callable[[], StageExecutor | None], step: Callable[[], int], *,
                 sync: Callable[[], ReplicaSync | None] | None = None,
                 chunk_bytes: int = WIRE_CHUNK_BYTES) -> None:
        self.p2p, self.key, self.stage, self.chunk_bytes = p2p, key, stage, chunk_bytes
        self.executor, self.step, self.sync = executor, step, sync
        self.stats = SyncStats()
        self._name: str | None = None

    async def start(self) -> StateServer:
        name = handler_name(self.key, STATE_METHOD)
        await self.p2p.add_protobuf_handler(name, self._handle, runtime_pb2.ExpertRequest,
                                            stream_input=True, stream_output=True)
        self._name = name
        return self

    async def stop(self) -> None:
        name, self._name = self._name, None
        if name is not None:
            with contextlib.suppress(Exception):
                await self.p2p.remove_protobuf_handler(name, stream_input=True, stream_output=True)

    async def snapshot(self) -> tuple[list[torch.Tensor], int]:
        """CPU copies of the stage's global parameters (the averaging anchor) and their round; of the
        parameters themselves where no averaging state exists. Taken between two optimizer steps."""
        def copy() -> tuple[list[torch.Tensor], int]:
            sync = self.sync() if self.sync is not None else None
            if sync is not None:
                return [t.clone() for t in sync.anchor], sync.round
            return [p.detach().to("cpu", copy=True) for p in self.stage.parameters()], 0
        return await locked(self.executor(), copy)  # type: ignore[return-value]

    async def _handle(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                      _: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        try:
            received = await read_frames(requests, max_bytes=_MAX_STATE_REQUEST_BYTES)
            if received is None:
                return
            if received.key != self.key:
                raise RequestRejected("bad_request", f"this handler serves {self.key!r}, not {received.key!r}")
            tensors, round_number = await self.snapshot()
            reply = Payload(tensors, meta={"step": int(self.step()), "count": len(tensors), "round": round_number})
        except (RequestRejected, WireError) as err:
            kind = err.kind if isinstance(err, RequestRejected) else "bad_request"
            message = err.message if isinstance(err, RequestRejected) else str(err)
            reply = Payload(meta={"error": {"kind": kind, "message": message}})
        self.stats.served += 1
        for frame in await encode_frames(response_frames(reply, "none", self.chunk_bytes)):
            self.stats.bytes_out += frame.ByteSize()
            yield frame


async def locked(executor: StageExecutor | None, fn: Callable[[], object]) -> object:
    """Run `fn` under `executor`'s lock, or at once when no executor computes on the stage yet."""
    if executor is None:
        return fn()
    return await executor.exclusive(fn)


async def fetch_state(client: StageClient, replica: Replica, key: str, stage: torch.nn.Module,
                      timeout: float) -> StageState:
    """One replica's state of the stage under `key`, checked against our own parameters' shapes."""
    client.add_addresses(replica.peer_id, replica.maddrs)
    before = client.stats.bytes_in
    payload = await client.call(replica.peer_id, key, STATE_METHOD, Payload(), "none", timeout)
    wire_bytes = client.stats.bytes_in - before
    params = list(stage.parameters())
    step = payload.meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise BadResponse(f"state of {key} carries step {step!r}")
    if len(payload.tensors) != len(params):
        raise BadResponse(f"state of {key} has {len(payload.tensors)} tensors, expected {len(params)}")
    for got, mine in zip(payload.tensors, params, strict=True):
        if got.shape != mine.shape or not got.is_floating_point():
            raise BadResponse(f"state of {key}: a {got.dtype} {tuple(got.shape)} tensor for {tuple(mine.shape)}")
    round_number = payload.meta.get("round", 0)
    if not isinstance(round_number, int) or isinstance(round_number, bool) or round_number < 0:
        raise BadResponse(f"state of {key} carries round {round_number!r}")
    return StageState(payload.tensors, step, wire_bytes, round_number)


async def fetch_served_state(client: StageClient, replica: Replica, key: str, stage: torch.nn.Module,
                             timeout: float, deadline: float,
                             on_wait: Callable[[float], None] | None = None) -> StageState:
    """`fetch_state` (each try within `timeout`), asked again every SERVED_POLL_S until `deadline`
    (monotonic) while the replica is up but does not serve `key` yet; `on_wait(seconds left)`
    hears of the first wait. Any other failure, or one at the deadline, is raised."""
    waited = False
    while True:
        try:
            return await asyncio.wait_for(fetch_state(client, replica, key, stage, timeout), timeout)
        except Exception as err:
            left = deadline - time.monotonic()
            if not not_serving_yet(err) or left <= 0:
                raise
        if not waited and on_wait is not None:
            on_wait(left)
        waited = True
        await asyncio.sleep(min(SERVED_POLL_S, left))


def load_state(stage: torch.nn.Module, tensors: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, t in zip(stage.parameters(), tensors, strict=True):
            p.copy_(t.to(p.device, p.dtype))
