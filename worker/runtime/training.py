"""The swarm worker's training runtime: its stage trains in the pipeline the coordinator planned.

`DataPlane` is the worker's one hivemind P2P daemon, started before the worker joins so its
peer id and addresses go into the profile (the coordinator lists them in GetSwarm, where the
first stage finds the others). `TrainingRuntime` is the `StageRuntime` for an assignment:

- stage 0 runs a `PipelineDriver`: it reads batches from its data shard and drives each step's
  microbatches through the replicas GetSwarm lists for stages 1..n-1, refreshing that route
  every few seconds and after a failed step; it trains only once every stage has a replica;
- every other stage serves itself with a `StageServer` under
  `{run_id}.stage{index}.{layer_start}-{layer_end}` and steps its AdamW every
  `training.batch_size` samples, with the run's learning-rate schedule.

Counters for the heartbeat (CounterBook): every stage reports the tokens and samples of the
microbatches it completed, compute and wait seconds, bytes sent and received by kind and its
local step. The loss is reported by the stage that computes it, the last one: the coordinator
counts progress (tokens and loss) from the last stage's heartbeats only. The driver learns the
same losses from its `forward_backward` replies and logs them, but does not report them, or
they would count twice (a one-stage pipeline's driver is the last stage and does report).

All coroutines (P2P handlers, the driver's loop, the route refresh) run on the worker's event
loop, beside the heartbeats; the stage's compute runs in the executor's threads, so the loop
stays free. The lifecycle calls start/reassign/stop from a worker thread: they build the stage
there and hand the rest to the loop. A re-assignment to the same work (`keeps_role`: a re-plan
that moved other workers, new codecs, a new averaging period, stage 0's new data shard) changes
the running role's settings in place; any other stops the role and starts the new one.

Replicas of a stage (worker.replicas.state_transfer): every stage, the first too, serves its
parameters and local step under `swarmtrain.pipeline.{key}.state`. A worker that builds a stage
which already has live replicas (per GetSwarm) downloads one replica's state once, before it
serves or drives (waiting briefly for a trained replica that does not serve yet), and starts
from the seed if that fails. Every `sync_period_steps` of its
local steps (0 counts as 1), the replica that leads the stage's rounds (worker.pipeline.
sync_round: the lowest peer id, or the next where that one starts none: worker.pipeline.
leadership) averages the replicas' parameters, and every replica that took part ends the
round on the same anchor: a DiLoCo outer step on the replicas' compressed
pseudo-gradients (worker.replicas.diloco). Rounds run beside the training (a replica only holds
its lock briefly, twice), but they share the stage's links with the activations: their bulk goes
at BULK_LINK_SHARE of the link (worker.pipeline.pacing), and rounds are spaced to keep the link
at most ROUND_LINK_SHARE busy with their bytes, and a round open at most ROUND_TIME_SHARE of the
time (`round_gap`), even when the period is a single step; a leader's first EARLY_ROUNDS rounds
are spaced by the time share alone, as the anchor lags the training most early in a run. State
bytes are counted as kind "state".

The period is the most steps between two rounds, not the cadence: the coordinator computes it
from datasheet compute rates, which overstate how fast a small stage steps many times over
(pipeline hops cost more than its compute), and so hands out periods far longer than the link
needs. A leader therefore starts its first round after at most FIRST_ROUND_STEPS steps, measures
what a round costs, and from then on starts one as soon as the rounds' share of the link allows,
or when the period is up, whichever comes first.

Checkpoints (worker.runtime.checkpoint_format): when a heartbeat reply asks this worker for its stage's part of a
checkpoint, the stage is copied between two optimizer steps and uploaded to the coordinator.
A new stage with no live replica to download from resumes from the newest complete checkpoint
instead of the seed (a whole swarm restarting, or the last replica of a stage lost); stage 0
then also resumes its data shard where the checkpoint's left off.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hivemind.p2p import P2P, PeerID

from configs.schema import RunConfig
from protos import swarmtrain_pb2 as pb
from worker.runtime.checkpoint_format import CheckpointLink, DataPosition, pack, resume, snapshot
from worker.telemetry.counters import CounterBook
from worker.pipeline import (
    PipelineDriver,
    PipelineError,
    Replica,
    Route,
    StageClient,
    StageRoute,
    StageServer,
)
from worker.replicas import LeaderWatch, StateServer, SyncFollower, lead_round
from worker.pipeline.admission import Admission
from worker.replicas.diloco import ReplicaSync
from worker.pipeline.executor import StageExecutor
from worker.pipeline.pacing import BULK_LINK_SHARE, Pacer
from worker.pipeline.stage_server import RequestOptions
from worker.replicas.state_transfer import StageState, fetch_served_state, locked
from worker.replicas.state_transfer import load_state as load_state_into
from worker.replicas.sync_round import RoundResult, params_digest
from worker.pipeline.wire import Payload
from worker.telemetry.trace import Trace
from worker.runtime.settings import codec_name, outer_settings

Log = Callable[[str], None]
FetchSwarm = Callable[[], Awaitable[pb.GetSwarmResponse]]

ROUTE_REFRESH_S = 3.0  # how often the driver re-reads where the other stages are
ROUTE_WAIT_S = 0.5  # between looks while a stage has no replica yet
RETRY_BACKOFF_S = (0.5, 5.0)  # after a failed step: first and longest pause
REPORT_INTERVAL_S = 0.5  # how often a served stage moves its counters to the heartbeat's book
CALL_TIMEOUT_S = 10.0  # on the loop: starting or stopping a role
MAX_MULTIADDRS = 16  # what the coordinator accepts in a profile
CHECKPOINT_LOAD_TIMEOUT_S = 600.0  # a stage's files from the coordinator, when resuming
DOWNLOAD_TIMEOUT_S = 5.0  # per replica, when a new replica fetches its stage's state
STATE_WAIT_S = 10.0  # how long a new replica waits, in all, for trained ones that do not serve their state yet
SYNC_POLL_S = 0.1  # how often a served stage looks whether an averaging round is due
ROUND_LINK_SHARE = 0.1  # at most this share of the link's capacity goes to averaging rounds
ROUND_TIME_SHARE = 1 / 3  # and at most this share of the time has a round open (lock waits, compute)
FIRST_ROUND_STEPS = 8  # a leader's first round comes this early, to measure what a round costs
EARLY_ROUNDS = 6  # the gaps after a leader's first rounds are set by ROUND_TIME_SHARE alone (round_gap)


def round_gap(seconds: float, round_bytes: int, link_bytes_per_s: float | None, *, early: bool = False) -> float:
    """Seconds from the end of a round that took `seconds` and moved `round_bytes` (both ways)
    until the next one, so that rounds use at most ROUND_LINK_SHARE of a link of
    `link_bytes_per_s` (unknown: count the whole round as link time) and are open at most
    ROUND_TIME_SHARE of the time (pure).

    `early` (a leader's first EARLY_ROUNDS rounds) drops the link share: early in a run the loss
    falls fastest, so the anchor, which is the swarm's model (what evaluations, checkpoints and
    exports read), lags the replicas' training most, and the replicas drift apart fastest. The
    time share still bounds them: a round is open at most a third of the time, and its bulk goes
    at BULK_LINK_SHARE of the sender's upload (worker.pipeline.pacing)."""
    link_s = round_bytes / link_bytes_per_s if link_bytes_per_s else seconds
    by_time = seconds * (1 / ROUND_TIME_SHARE - 1)
    if early:
        return max(by_time, 0.0)
    return max(link_s / ROUND_LINK_SHARE - seconds, by_time, 0.0)


def download_order(replicas: list[Replica], trained: set[str], limit: int = 3) -> list[tuple[Replica, bool]]:
    """Which of our stage's listed replicas a new replica downloads its state from, in order, and
    whether to wait for each while it does not serve yet (pure). Those that have trained come
    first and are waited for: one that does not serve then is restarting its role (as it does when
    a re-assignment gives it other work; keeps_role).
    One that has not trained holds the seed, as we do, or is downloading itself, maybe from us:
    waiting for it could only stall us both."""
    first = [r for r in replicas if r.peer_id.to_base58() in trained]
    rest = [r for r in replicas if r.peer_id.to_base58() not in trained]
    return [(r, True) for r in first][:limit] + [(r, False) for r in rest][:max(0, limit - len(first))]


# what a role is built from; a re-assignment that changes none of these nor the stage boundaries
# (only codecs, the averaging period, overlapped steps, stage 0's data shard or the plan version)
# is applied in place (keeps_role)
ROLE_FIELDS = ("stage_index", "num_stages", "layer_start", "layer_end", "averaging_group", "config_hash")


def keeps_role(old: pb.Assignment | None, new: pb.Assignment) -> bool:
    """Whether `new` asks for the same work as `old`, with other settings at most (pure).

    A re-plan re-issues every worker's assignment, and the coordinator re-issues one whose
    measured compute rate changes its codecs or period; restarting the role for those would stop
    a served stage's server (its driver's calls fail over) or a driver mid-step, and make a
    joiner wait for state. Stage 0 moves to a new data shard between two steps (a replica of
    stage 0 joined or left), so that too is a setting."""
    if old is None or any(getattr(old, f) != getattr(new, f) for f in ROLE_FIELDS):
        return False
    return list(old.stage_boundaries) == list(new.stage_boundaries)


def stage_key(run_id: str, index: int, start: int, end: int) -> str:
    return f"{run_id}.stage{index}.{start}-{end}"


def listen_maddr(host: str) -> str:
    return f"/ip6/{host}/tcp/0" if ":" in host else f"/ip4/{host}/tcp/0"


# ---- the P2P daemon ---------------------------------------------------------------------


class DataPlane:
    """This worker's P2P daemon, listening on `host` on a free port, for as long as the worker runs."""

    def __init__(self, p2p: P2P, multiaddrs: list[str]) -> None:
        self.p2p = p2p
        self.peer_id = p2p.peer_id.to_base58()
        self.multiaddrs = multiaddrs

    @classmethod
    async def start(cls, host: str, identity: Path | None = None) -> DataPlane:
        # Ctrl-C reaches the whole process group: the daemon must leave it to us (SIGTERM it
        # keeps, so that shutting it down still works). Call from the main thread.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            # an identity file keeps the peer id (and with it bans and reports) across restarts
            p2p = await P2P.create(host_maddrs=[listen_maddr(host)],
                                   identity_path=str(identity) if identity is not None else None)
        finally:
            signal.signal(signal.SIGINT, previous)
        try:
            visible = [str(m) for m in await p2p.get_visible_maddrs()]
        except BaseException:
            await p2p.shutdown()
            raise
        return cls(p2p, visible[:MAX_MULTIADDRS])

    async def shutdown(self) -> None:
        await self.p2p.shutdown()


# ---- traffic by kind --------------------------------------------------------------------


class _Traffic:
    """Bytes on the wire by kind. Stage clients and servers count wire bytes per call but not by
    kind; the calls' tensors tell how much of each direction was activations and how much
    gradients (uncompressed), and the wire bytes are split in that proportion."""

    KINDS = (pb.TRAFFIC_KIND_ACTIVATIONS, pb.TRAFFIC_KIND_GRADIENTS)

    def __init__(self) -> None:
        self.sent = dict.fromkeys(self.KINDS, 0)  # uncompressed, since the last report
        self.received = dict.fromkeys(self.KINDS, 0)
        self._wire_out = self._wire_in = 0

    def note(self, direction: str, kind: int, *tensors: torch.Tensor | None) -> None:
        tally = self.sent if direction == "sent" else self.received
        tally[kind] += sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def report(self, counters: CounterBook, wire_out: int, wire_in: int) -> None:
        out, into = wire_out - self._wire_out, wire_in - self._wire_in
        self._wire_out, self._wire_in = wire_out, wire_in
        sent_total, received_total = sum(self.sent.values()), sum(self.received.values())
        for kind in self.KINDS:
            sent = round(out * self.sent[kind] / sent_total) if sent_total else 0
            received = round(into * self.received[kind] / received_total) if received_total else 0
            if sent or received:
                counters.add_traffic(kind, sent=sent, received=received, uncompressed=self.sent[kind])
        self.sent = dict.fromkeys(self.KINDS, 0)
        self.received = dict.fromkeys(self.KINDS, 0)


ACT, GRAD = pb.TRAFFIC_KIND_ACTIVATIONS, pb.TRAFFIC_KIND_GRADIENTS


class _CountingClient(StageClient):
    """A StageClient that notes which of its bytes are activations and which gradients."""

    def __init__(self, p2p: P2P) -> None:
        super().__init__(p2p)
        self.traffic = _Traffic()

    async def forward(self, peer_id: PeerID, key: str, inputs: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        out = await super().forward(peer_id, key, inputs, *args, **kw)
        self.traffic.note("sent", ACT, inputs)
        self.traffic.note("received", ACT, out)
        return out

    async def backward(self, peer_id: PeerID, key: str, inputs: torch.Tensor, grad_outputs: torch.Tensor,
                       *args: Any, **kw: Any) -> torch.Tensor | None:
        grad = await super().backward(peer_id, key, inputs, grad_outputs, *args, **kw)
        self.traffic.note("sent", ACT, inputs)
        self.traffic.note("sent", GRAD, grad_outputs)
        self.traffic.note("received", GRAD, grad)
        return grad

    async def forward_backward(self, peer_id: PeerID, key: str, hidden: torch.Tensor, targets: torch.Tensor,
                               *args: Any, **kw: Any) -> tuple[float, torch.Tensor | None]:
        loss, grad = await super().forward_backward(peer_id, key, hidden, targets, *args, **kw)
        self.traffic.note("sent", ACT, hidden, targets)
        self.traffic.note("received", GRAD, grad)
        return loss, grad


class _CountingServer(StageServer):
    """A StageServer that notes its traffic by kind and, as the last stage, reports each loss."""

    def __init__(self, *args: Any, counters: CounterBook, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.counters = counters
        self.traffic = _Traffic()

    async def _forward(self, tensors: list[torch.Tensor], options: RequestOptions) -> Payload:
        reply = await super()._forward(tensors, options)
        self.traffic.note("received", ACT, *tensors)
        self.traffic.note("sent", ACT, *reply.tensors)
        return reply

    async def _backward(self, tensors: list[torch.Tensor], options: RequestOptions) -> Payload:
        reply = await super()._backward(tensors, options)
        self.traffic.note("received", ACT, tensors[0])
        self.traffic.note("received", GRAD, *tensors[1:])
        self.traffic.note("sent", GRAD, *reply.tensors)
        return reply

    async def _forward_backward(self, tensors: list[torch.Tensor], options: RequestOptions) -> Payload:
        reply = await super()._forward_backward(tensors, options)
        self.traffic.note("received", ACT, *tensors)
        self.traffic.note("sent", GRAD, *reply.tensors)
        self.counters.add_loss(float(reply.meta["loss"]))  # finite: the executor refuses others
        return reply


# ---- the runtime ------------------------------------------------------------------------


@dataclass
class _Role:
    """What runs for the current assignment on the loop: a served stage or the driver."""

    tasks: list[asyncio.Task[Any]]
    server: _CountingServer | None = None
    state: StateServer | None = None
    follower: SyncFollower | None = None


class TrainingRuntime:
    """A StageRuntime that trains its stage in the pipeline (see the module docstring)."""

    def __init__(self, config: RunConfig, device: torch.device, counters: CounterBook, log: Log, *,
                 plane: DataPlane, loop: asyncio.AbstractEventLoop, run_id: str,
                 fetch_swarm: FetchSwarm, trace: Trace | None = None,
                 checkpoints: CheckpointLink | None = None, lie_scale: float | None = None,
                 withhold_rounds_s: float = 0.0, upload_bps: float | None = None) -> None:
        self.config, self.device, self.counters, self.log = config, device, counters, log
        self.trace = trace or Trace()
        self.admission = Admission(self._admitted_peers)
        self.plane, self.loop, self.run_id, self.fetch_swarm = plane, loop, run_id, fetch_swarm
        self.stage: Any = None
        self.sync: Any = None  # ReplicaSync of the stage: the anchor of its averaging rounds
        self.optimizer: torch.optim.Optimizer | None = None
        self.span: tuple[int, int] | None = None
        self.steps = 0  # optimizer steps this stage has taken, across role restarts
        self._data: Any = None  # TokenData, built once by the first stage 0 assignment
        self._role: _Role | None = None
        self._served_seen = (0, 0, 0.0, 0, 0.0)  # a served stage's stats at the last report, and when
        self._last_log: float | None = None
        self._executor: StageExecutor | None = None  # what computes on the stage now, if anything
        self._state_client: StageClient | None = None  # for state downloads and averaging rounds
        self._state_sent = 0  # the state server's bytes out at the last report
        self._follower_seen = (0, 0)  # the sync follower's bytes out and in at the last report
        self._stage_index, self._sync_period = -1, 1
        self._next_round_at = 0.0  # when this replica may lead its next averaging round
        self._rounds_led = 0  # averaging rounds this replica led; after the first, _next_round_at is measured
        self._peers: tuple[float, list[Replica]] = (float("-inf"), [])  # our stage's other replicas, and when read
        self._trained: set[str] = set()  # their peer ids that have trained (a measured rate): state worth waiting for
        self._sync_said = False
        self._on_failure: Callable[[BaseException], None] | None = None  # the lifecycle's, see watch
        # averaging rounds' bulk goes out at a share of our link, so activations pass between it
        self._link_bytes_per_s = upload_bps / 8 if upload_bps else None
        self._bulk = Pacer(self._link_bytes_per_s * BULK_LINK_SHARE) if self._link_bytes_per_s else None
        self.checkpoints = checkpoints
        self.lie_scale = lie_scale  # worker --lie-scale: resilience tests only
        self.withhold_rounds_s = withhold_rounds_s  # worker --withhold-rounds: resilience tests only
        self._watch: LeaderWatch | None = None  # who leads our stage's rounds (per role)
        self._standing_in = False  # we lead because every lower replica was passed over
        self._withheld_until = 0.0  # worker --withhold-rounds: we lead no round before this
        self._checkpoints_taken: set[int] = set()  # checkpoint ids being saved or saved
        self._checkpoint_tasks: set[asyncio.Task[None]] = set()
        self._driver: PipelineDriver | None = None
        self._driver_counted = 0  # the driver's steps already added to self.steps
        self._assignment: pb.Assignment | None = None  # the role's, with its settings as last changed
        self._data_at: DataPosition | None = None  # microbatches stage 0 trained of its shard

    # ---- the StageRuntime calls (from a worker thread) ----------------------------------

    def start(self, assignment: pb.Assignment) -> None:
        self._apply(assignment)

    def reassign(self, assignment: pb.Assignment) -> None:
        self._apply(assignment)

    def stop(self) -> None:
        self._on_loop(self._stop_role())
        self.stage = self.optimizer = self.span = self._assignment = None

    def watch(self, on_failure: Callable[[BaseException], None]) -> None:
        self._on_failure = on_failure

    def _watched(self, tasks: list[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
        """`tasks`, each reported to the lifecycle if it dies of an error: a driver or server that
        stopped must not leave a worker that heartbeats as if it trained."""
        def done(task: asyncio.Task[Any]) -> None:
            err = None if task.cancelled() else task.exception()
            if err is None:
                return
            self.log("".join(traceback.format_exception(err)).rstrip())
            if self._on_failure is not None:
                self._on_failure(err)
        for task in tasks:
            task.add_done_callback(done)
        return tasks

    # ---- building ------------------------------------------------------------------------

    def _apply(self, assignment: pb.Assignment) -> None:
        from worker.runtime.standalone import build_optimizer
        from worker.model.stage import build_stage

        if self._role is not None and keeps_role(self._assignment, assignment):
            self._on_loop(self._adjust_role(assignment))
            return
        self._on_loop(self._stop_role())
        span = (assignment.layer_start, assignment.layer_end)
        self.trace.write("assign", stage=assignment.stage_index, layers=list(span),
                         plan_version=assignment.plan_version)
        training = self.config.training
        fresh = self.stage is None or self.span != span
        if fresh:
            started = time.perf_counter()
            stage = build_stage(self.config.model, *span, seed=training.seed).to(self.device)
            self.stage, self.optimizer, self.span = stage, build_optimizer(stage, training), span
            self.steps = 0
            self.sync = ReplicaSync(list(stage.parameters()), outer_settings(assignment, training),
                                    lie_scale=self.lie_scale)
            params = sum(p.numel() for p in stage.parameters())
            self.log(f"stage {assignment.stage_index} ready: {params:,} parameters on {self.device.type} in "
                     f"{time.perf_counter() - started:.1f}s")
        else:
            self.sync.configure(outer_settings(assignment, training))
        if assignment.stage_index == 0 and self._data is None:
            from worker.data.tokens import TokenData

            self._data = TokenData(self.config.data, training.seq_len, training.seed)
        self._peers = (float("-inf"), [])
        download_s = CALL_TIMEOUT_S + 3 * DOWNLOAD_TIMEOUT_S + STATE_WAIT_S
        if fresh and not self._on_loop(self._download_state(assignment), download_s):
            self._on_loop(self._resume_from_checkpoint(assignment), CHECKPOINT_LOAD_TIMEOUT_S)
        self._on_loop(self._start_role(assignment))

    async def _adjust_role(self, assignment: pb.Assignment) -> None:
        """The running role takes `assignment`'s settings (keeps_role): on the loop, between two of
        its coroutines' steps; a round or microbatch in flight finishes with the old ones."""
        self._assignment = assignment
        self.trace.write("assign", stage=assignment.stage_index, layers=list(self.span or ()),
                         plan_version=assignment.plan_version, in_place=True)
        self.sync.configure(outer_settings(assignment, self.config.training))
        self._sync_period = max(1, assignment.sync_period_steps)
        self._peers = (float("-inf"), [])  # a new plan may list other replicas
        if self._driver is not None:
            self._driver.codec = codec_name(assignment.activation_compression)
            self._driver.overlap_steps = assignment.overlap_steps  # sent-ahead microbatches still finish
        # the lifecycle's `assigned:` line just before this one names the new settings
        self.log(f"stage {assignment.stage_index} goes on with its new assignment (no restart)")

    def _on_loop(self, coro: Awaitable[Any], timeout: float = CALL_TIMEOUT_S) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def _lr_at(self) -> Callable[[int], float]:
        from worker.model.schedule import learning_rate_at

        training, offset = self.config.training, self.steps
        return lambda step: learning_rate_at(offset + step, training)

    async def _start_role(self, assignment: pb.Assignment) -> None:
        self._assignment = assignment
        key = stage_key(self.run_id, assignment.stage_index, assignment.layer_start, assignment.layer_end)
        self._executor = None
        state = StateServer(self.plane.p2p, key, self.stage, lambda: self._executor, lambda: self.steps,
                            sync=lambda: self.sync)
        await state.start()
        follower = SyncFollower(self.plane.p2p, key, self.stage, self.sync, lambda: self._executor, lambda: self.steps,
                                self._followed, admits=self.admission.admits, on_refused=self.counters.report_peer,
                                pacer=self._bulk, follows=self._follows)
        await follower.start()
        self._state_sent, self._follower_seen = 0, (0, 0)
        self._stage_index, self._sync_period = assignment.stage_index, max(1, assignment.sync_period_steps)
        self._watch, self._standing_in = LeaderWatch(self.plane.peer_id), False
        self._withheld_until = time.monotonic() + self.withhold_rounds_s
        if assignment.stage_index == 0:
            def driven() -> StageExecutor | None:
                return self._driver.local if self._driver is not None else None

            tasks = [asyncio.create_task(self._drive(assignment)),
                     asyncio.create_task(self._sync_rounds(assignment, driven))]
            self._role = _Role(self._watched(tasks), state=state, follower=follower)
            self.log(f"stage 0 drives the pipeline · data shard {assignment.data_shard_index}/"
                     f"{max(1, assignment.data_shard_count)} · activations {codec_name(assignment.activation_compression)}")
            return
        training = self.config.training
        optimizer = self.optimizer
        server = _CountingServer(self.plane.p2p, self.stage, key, lambda _: optimizer, training.batch_size,
                                 grad_clip=training.grad_clip, lr_at=self._lr_at(), counters=self.counters,
                                 admits=self.admission.admits, on_refused=self.counters.report_peer)
        self._executor = server.executor
        await server.start()
        self._served_seen = (0, 0, 0.0, 0, time.perf_counter())
        self._role = _Role(self._watched([asyncio.create_task(self._report_served(server)),
                                          asyncio.create_task(self._sync_rounds(assignment, lambda: server.executor))]),
                           server, state, follower)
        self.log(f"stage {assignment.stage_index} serving {key} on peer {self.plane.peer_id}")

    async def _stop_role(self) -> None:
        role, self._role = self._role, None
        if role is None:
            return
        executor = self._executor
        if role.server is not None:
            await role.server.stop()
        if role.state is not None:
            await role.state.stop()
        if role.follower is not None:
            await role.follower.stop()
        for task in role.tasks:
            task.cancel()
        for task in role.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._driver = None
        if executor is not None:
            # a cancelled call's compute (a backward, an optimizer step) finishes in its thread:
            # let it, before the next role computes on the same parameters
            with contextlib.suppress(Exception):
                await asyncio.wait_for(executor.exclusive(lambda: None), CALL_TIMEOUT_S)
        if role.server is not None:
            self._flush_served(role.server)
        if role.state is not None:
            self._report_state_sent(role.state)
        if role.follower is not None:
            self._report_follower(role.follower)
        self._executor = None

    # ---- a served stage ------------------------------------------------------------------

    async def _report_served(self, server: _CountingServer) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL_S)
            self._flush_served(server)

    def _flush_served(self, server: _CountingServer) -> None:
        stats = server.stats
        samples, tokens, compute_s, steps, then = self._served_seen
        now = time.perf_counter()
        computed = max(0.0, stats.compute_s - compute_s)
        self.counters.add_work(tokens=stats.tokens - tokens, samples=stats.samples - samples,
                               compute_s=computed, wait_s=max(0.0, now - then - computed))
        server.traffic.report(self.counters, stats.bytes_out, stats.bytes_in)
        if self._role is not None and self._role.state is not None:
            self._report_state_sent(self._role.state)
        if self._role is not None and self._role.follower is not None:
            self._report_follower(self._role.follower)
        self.steps += stats.steps - steps
        self.counters.set_local_step(self.steps)
        self._served_seen = (stats.samples, stats.tokens, stats.compute_s, stats.steps, now)

    # ---- the first stage -----------------------------------------------------------------

    async def _drive(self, assignment: pb.Assignment) -> None:
        training = self.config.training
        micro = training.micro_batch_size
        per_step = max(1, training.batch_size // micro)
        shard, shards = assignment.data_shard_index, max(1, assignment.data_shard_count)
        batches = self._open_shard(shard, shards)
        client = _CountingClient(self.plane.p2p)
        driver: PipelineDriver | None = None
        route: Route | None = None
        refreshed = float("-inf")
        backoff = RETRY_BACKOFF_S[0]
        waiting_said = False
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        following: list[tuple[torch.Tensor, torch.Tensor]] = []  # read ahead when steps overlap
        try:
            while True:
                settings = self._assignment or assignment
                moved = (settings.data_shard_index, max(1, settings.data_shard_count))
                if moved != (shard, shards) and not pending:  # a re-plan split the data anew: between steps
                    if driver is not None:
                        await driver.drop_ahead()  # read from the old shard; not trained, so not counted
                    following = []
                    shard, shards = moved
                    batches = self._open_shard(shard, shards)
                    self.log(f"stage 0 reads data shard {shard}/{shards} from microbatch "
                             f"{self._data_at.microbatches if self._data_at else 0} on")
                if route is None or time.monotonic() - refreshed > ROUTE_REFRESH_S:
                    found, why = await self._route(assignment, route)
                    refreshed = time.monotonic()
                    if found is None:
                        if not waiting_said:
                            self.log(f"stage 0 waiting for the pipeline: {why}")
                            waiting_said = True
                        route = None
                        await asyncio.sleep(ROUTE_WAIT_S)
                        continue
                    if found != route:
                        if driver is None:
                            # read again: an in-place change may have come while _route awaited
                            settings = self._assignment or assignment
                            driver = PipelineDriver(
                                client, self.stage, self.optimizer, found, batch_size=training.batch_size,
                                codec=codec_name(settings.activation_compression),
                                grad_clip=training.grad_clip, lr_at=self._lr_at(), seed=training.seed,
                                overlap_steps=settings.overlap_steps)
                            self._driver, self._driver_counted = driver, 0
                        else:
                            driver.set_route(found)
                        self._executor = driver.local
                        if route is None:
                            counts = ", ".join(f"stage {s.index}: {len(s.replicas)} replica(s)" for s in found.stages)
                            self.log(f"pipeline complete ({counts or 'a single stage'}): training")
                        route, waiting_said = found, False
                assert driver is not None and route is not None
                compute_before = driver.local.stats.compute_s
                # a failed step is retried on the same microbatches: a lost peer costs time, never data
                if not pending:
                    pending, following = following or [next(batches) for _ in range(per_step)], []
                if driver.overlap_steps and not following:
                    following = [next(batches) for _ in range(per_step)]
                try:
                    report = await driver.train_step(pending, following)
                except PipelineError as err:
                    self.log(f"step failed: {str(err).splitlines()[0][:300]}; re-reading the route")
                    refreshed = float("-inf")
                    await asyncio.sleep(backoff)
                    backoff = min(RETRY_BACKOFF_S[1], backoff * 2)
                    continue
                finally:
                    self.steps += driver.local.stats.steps - self._driver_counted
                    self._driver_counted = driver.local.stats.steps
                    self.counters.set_local_step(self.steps)
                    client.traffic.report(self.counters, client.stats.bytes_out, client.stats.bytes_in)
                backoff = RETRY_BACKOFF_S[0]
                self._data_at = DataPosition(shard, shards, self._data_at.microbatches + len(pending))
                pending = []
                computed = driver.local.stats.compute_s - compute_before
                self.counters.add_work(tokens=report.samples * training.seq_len, samples=report.samples,
                                       compute_s=computed, wait_s=max(0.0, report.seconds - computed))
                if self.stage.is_last:  # a one-stage pipeline computes its loss here
                    self.counters.add_loss(report.loss * per_step, per_step)
                self._log_step(report)
                self.trace.write("step", stage=0, step=self.steps, loss=report.loss, samples=report.samples,
                                 seconds=round(report.seconds, 4), retries=report.retries)
                if self._role is not None and self._role.state is not None:
                    self._report_state_sent(self._role.state)
                if self._role is not None and self._role.follower is not None:
                    self._report_follower(self._role.follower)
        finally:
            if driver is not None:  # no microbatch sent on early outlives the drive
                await driver.drop_ahead()

    def _open_shard(self, shard: int, shards: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Stage 0's batches of data shard `shard` of `shards`, from where this stage stopped (a
        re-assignment, a checkpoint, a split into another number of shards), not its beginning."""
        at = self._data_at
        start = 0 if at is None else at.microbatches if (at.shard_index, at.shard_count) == (shard, shards) \
            else at.start_for(shards)
        self._data_at = DataPosition(shard, shards, start)
        return self._data.train_batches(self.config.training.micro_batch_size, shard, shards, start_step=start)

    def _log_step(self, report: Any) -> None:
        now = time.monotonic()
        last = self._last_log
        if last is None or now - last >= self.config.worker.log_interval_s:
            self._last_log = now
            rate = report.samples * self.config.training.seq_len / max(report.seconds, 1e-9)
            self.log(f"step {self.steps} · loss {report.loss:.3f} · {rate:,.0f} tok/s")

    # ---- checkpoints ---------------------------------------------------------------------

    def request_checkpoint(self, request: pb.CheckpointRequest) -> None:
        """The coordinator asked for our stage's part of a checkpoint (on the loop, from a heartbeat
        reply, which repeats the request until the part arrives)."""
        if self.checkpoints is None or request.checkpoint_id in self._checkpoints_taken:
            return
        self._checkpoints_taken.add(request.checkpoint_id)
        task = asyncio.create_task(self._save_checkpoint(request))
        self._checkpoint_tasks.add(task)
        task.add_done_callback(self._checkpoint_tasks.discard)

    def _live_step(self) -> int:
        """Optimizer steps of the stage up to now, counting those not yet moved to self.steps."""
        role = self._role
        if role is not None and role.server is not None:
            return self.steps + role.server.stats.steps - self._served_seen[3]
        if self._driver is not None:
            return self.steps + self._driver.local.stats.steps - self._driver_counted
        return self.steps

    async def _save_checkpoint(self, request: pb.CheckpointRequest) -> None:
        assert self.checkpoints is not None
        stage, optimizer, sync = self.stage, self.optimizer, self.sync
        if (stage is None or self._role is None or self.span != (request.layer_start, request.layer_end)
                or self._stage_index != request.stage_index):
            # not running that stage (yet): a stage still resuming must not overwrite the
            # checkpoint it resumes from with its seed. The next heartbeat asks again.
            self._checkpoints_taken.discard(request.checkpoint_id)
            return
        started = time.monotonic()

        def take() -> tuple[dict[str, torch.Tensor], int, int, DataPosition | None]:
            return snapshot(stage, optimizer, sync), self._live_step(), sync.round, \
                self._data_at if stage.is_first else None

        try:
            tensors, step, round_number, data = await locked(self._executor, take)  # type: ignore[misc]
            header, blob = await asyncio.to_thread(pack, tensors, request, step, round_number, data)
            complete = await self.checkpoints.upload(header, blob)
        except Exception as err:  # noqa: BLE001 - asked again by the next heartbeat if still wanted
            self._checkpoints_taken.discard(request.checkpoint_id)
            self.log(f"stage {request.stage_index}: checkpoint {request.checkpoint_id} not saved "
                     f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})")
            return
        self.counters.add_traffic(pb.TRAFFIC_KIND_STATE, sent=len(blob))
        digest = params_digest([tensors[f"param/{name}"] for name, _ in stage.named_parameters()])
        self.log(f"stage {request.stage_index} saved to checkpoint {request.checkpoint_id} at step {step} "
                 f"({len(blob) / 1e6:.1f} MB in {time.monotonic() - started:.1f}s)"
                 + ("; the checkpoint is complete" if complete else ""))
        self.trace.write("checkpoint", checkpoint=request.checkpoint_id, stage=request.stage_index, step=step,
                         digest=digest, bytes=len(blob), complete=complete,
                         **({"data": data.microbatches} if data is not None else {}))

    async def _resume_from_checkpoint(self, assignment: pb.Assignment) -> bool:
        """A new stage nobody serves yet: start from the newest complete checkpoint, if any."""
        if self.checkpoints is None:
            return False
        index, (start, end) = assignment.stage_index, (assignment.layer_start, assignment.layer_end)
        try:
            files = await self.checkpoints.download(start, end)
            if not files:
                self.log(f"stage {index}: no live replica and no checkpoint yet; starting from the seed")
                return False
            resumed = await asyncio.to_thread(resume, files, self.stage, self.optimizer, self.sync)
        except Exception as err:  # noqa: BLE001 - a mismatch or a failed call: the seed, and say why
            self.log(f"stage {index} cannot resume from the coordinator's checkpoint "
                     f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}); "
                     "starting from the seed")
            return False
        self.steps = resumed.step
        self.counters.set_local_step(self.steps)
        if resumed.data is not None:
            self._data_at = resumed.data
        size = sum(len(blob) for _, blob in files)
        self.counters.add_traffic(pb.TRAFFIC_KIND_STATE, received=size)
        self.log(f"stage {index} resumed from checkpoint {resumed.checkpoint_id} at step {resumed.step} "
                 f"({resumed.files} file(s), {size:,} bytes)")
        self.trace.write("resume", checkpoint=resumed.checkpoint_id, stage=index, step=resumed.step,
                         digest=params_digest(list(self.stage.parameters())),
                         **({"data": resumed.data.microbatches} if resumed.data else {}))
        return True

    # ---- replicas of our stage: state download and averaging ------------------------------

    def _client(self) -> StageClient:
        if self._state_client is None:
            self._state_client = StageClient(self.plane.p2p)
        return self._state_client

    def _report_state_sent(self, state: StateServer) -> None:
        sent = state.stats.bytes_out - self._state_sent
        self._state_sent = state.stats.bytes_out
        if sent > 0:
            self.counters.add_traffic(pb.TRAFFIC_KIND_STATE, sent=sent)

    def _report_state_received(self, wire_bytes: int) -> None:
        if wire_bytes > 0:
            self.counters.add_traffic(pb.TRAFFIC_KIND_STATE, received=wire_bytes)

    def _report_follower(self, follower: SyncFollower) -> None:
        out, into = self._follower_seen
        self._follower_seen = (follower.bytes_out, follower.bytes_in)
        if follower.bytes_out > out or follower.bytes_in > into:
            self.counters.add_traffic(pb.TRAFFIC_KIND_STATE, sent=follower.bytes_out - out,
                                      received=follower.bytes_in - into)

    async def _admitted_peers(self) -> set[str]:
        """Peer ids of the swarm's active workers: who may call our compute and averaging handlers."""
        swarm = await self.fetch_swarm()
        return {w.peer_id for w in swarm.workers if w.state == pb.WORKER_STATE_ACTIVE and w.peer_id}

    async def _stage_replicas(self, assignment: pb.Assignment) -> list[Replica]:
        """The other live replicas of our stage per GetSwarm (re-read every few seconds); [] if unknown."""
        read_at, replicas = self._peers
        if time.monotonic() - read_at < ROUTE_REFRESH_S:
            return replicas
        try:
            swarm = await self.fetch_swarm()
        except Exception:  # noqa: BLE001 - the coordinator may be away: keep what we knew
            return replicas
        spans = {s.stage_index: (s.layer_start, s.layer_end) for s in swarm.stages}
        found, trained = [], set()
        if spans.get(assignment.stage_index) == self.span:
            for worker in swarm.workers:
                if (worker.state == pb.WORKER_STATE_ACTIVE and worker.stage_index == assignment.stage_index
                        and worker.peer_id and worker.peer_id != self.plane.peer_id):
                    try:
                        found.append(Replica(PeerID.from_base58(worker.peer_id), tuple(worker.multiaddrs)))
                    except Exception:  # noqa: BLE001 - a peer id we cannot read: skip that worker
                        continue
                    if worker.tokens_per_second > 0:
                        trained.add(worker.peer_id)
        self._peers, self._trained = (time.monotonic(), found), trained
        return found

    async def _download_state(self, assignment: pb.Assignment) -> bool:
        """Once per new stage: start from a live replica's parameters and step rather than the seed.
        Returns whether it did."""
        replicas = await self._stage_replicas(assignment)
        if not replicas:
            return False
        why, deadline = "", time.monotonic() + STATE_WAIT_S
        for replica, wait in download_order(replicas, self._trained):
            try:
                state = await self._fetch_state(assignment, replica, deadline if wait else 0.0)
            except Exception as err:  # noqa: BLE001 - any failure: try the next replica, then the seed
                why = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                continue
            self._take_anchor(state)
            self.steps = state.step
            self.counters.set_local_step(self.steps)
            self._report_state_received(state.wire_bytes)
            self.log(f"stage {assignment.stage_index} state downloaded from peer {replica.peer_id.to_base58()} "
                     f"at step {state.step} ({state.wire_bytes:,} bytes)")
            return True
        self.log(f"stage {assignment.stage_index} state download failed ({why})")
        return False

    async def _fetch_state(self, assignment: pb.Assignment, replica: Replica, wait_until: float = 0.0) -> StageState:
        """`replica`'s state of our stage (its anchor, the anchor's round, its step), each try within
        DOWNLOAD_TIMEOUT_S; asked again until `wait_until` (monotonic) while it does not serve it yet."""
        key = stage_key(self.run_id, assignment.stage_index, assignment.layer_start, assignment.layer_end)

        def waiting(left: float) -> None:
            self.log(f"stage {assignment.stage_index}: replica {replica.peer_id.to_base58()[-8:]} does not "
                     f"serve its state yet; waiting up to {left:.0f}s")
        return await fetch_served_state(self._client(), replica, key, self.stage, DOWNLOAD_TIMEOUT_S, wait_until,
                                        waiting)

    def _take_anchor(self, state: StageState) -> None:
        """Our stage's parameters and averaging anchor become `state`'s (a download, or a catch-up);
        under the stage's lock where something computes on it."""
        load_state_into(self.stage, state.tensors)
        self.sync.reset(state.tensors, state.round)

    async def _sync_round(self, assignment: pb.Assignment, executor: StageExecutor, step_s: float) -> None:
        """Lead an averaging round if this replica leads its stage's rounds; the others follow.
        `step_s`: our seconds per step, which with the period sets how often rounds come."""
        if time.monotonic() < self._next_round_at:
            return
        replicas = await self._stage_replicas(assignment)
        if not replicas:  # alone: our parameters are the stage's anchor
            stage, sync = self.stage, self.sync
            await executor.exclusive(lambda: sync.adopt([p.detach() for p in stage.parameters()]))
            return
        followers = self._round_followers(assignment.stage_index, replicas, step_s)
        follower = self._role.follower if self._role is not None else None
        if not followers or (follower is not None and follower.holding):  # never lead and follow at once
            return
        key = stage_key(self.run_id, assignment.stage_index, assignment.layer_start, assignment.layer_end)
        client = self._client()
        sent_before = client.stats.bytes_out
        if follower is not None:
            follower.leading = True
        try:
            result = await lead_round(client, followers, key, self.stage, executor, self.sync, pacer=self._bulk)
        finally:
            if follower is not None:
                follower.leading = False
        if result.newer:
            await self._catch_up(assignment, result.newer, executor)
        self._rounds_led += 1
        self._next_round_at = time.monotonic() + round_gap(
            result.seconds, result.bytes_in + client.stats.bytes_out - sent_before,
            self._link_bytes_per_s, early=self._rounds_led <= EARLY_ROUNDS)
        self._report_state_received(result.bytes_in)
        if client.stats.bytes_out > sent_before:
            self.counters.add_traffic(pb.TRAFFIC_KIND_STATE, sent=client.stats.bytes_out - sent_before)
        self._round_done(assignment.stage_index, result)

    async def _catch_up(self, assignment: pb.Assignment, peer: str, executor: StageExecutor) -> None:
        """Our anchor is older than `peer`'s: the stage averaged without us (we stalled, or were
        away). Take the stage's anchor from it, as a joining replica does; what we trained on the
        stale one is dropped."""
        replica = next((r for r in self._peers[1] if r.peer_id.to_base58() == peer), None)
        if replica is None:
            return
        try:
            state = await self._fetch_state(assignment, replica)
        except Exception as err:  # noqa: BLE001 - any failure: the next round finds us behind again
            self.log(f"stage {assignment.stage_index}: catching up with peer {peer[-8:]} failed "
                     f"({type(err).__name__}); trying again at the next round")
            return
        def adopt() -> bool:
            if state.round <= self.sync.round:  # a round brought us there meanwhile
                return False
            self._take_anchor(state)
            return True
        if await executor.exclusive(adopt):
            self._report_state_received(state.wire_bytes)
            self.log(f"stage {assignment.stage_index}: behind the stage's averaging; took its anchor "
                     f"(round {state.round}) from peer {peer[-8:]}")

    def _follows(self, leader: str) -> bool:
        """Whether to answer `leader`'s begin (worker.replicas.leadership); on the loop."""
        if self._watch is None:
            return True
        return self._watch.accepts(leader, [r.peer_id.to_base58() for r in self._peers[1]])

    def _round_followers(self, stage_index: int, replicas: list[Replica], step_s: float) -> list[Replica]:
        """The replicas we lead this round among; [] where another replica leads (or where nobody is
        left above us). A lower replica that started no round for long is passed over (leadership)."""
        watch = self._watch
        if watch is None:
            return []
        ids = [r.peer_id.to_base58() for r in replicas]
        silence = watch.silence()
        silent = watch.silent_leader(ids, self._sync_period * step_s)
        if silent is not None:
            self.log(f"stage {stage_index}: replica {silent[-8:]} started no averaging round for "
                     f"{silence:.0f}s; passing it over")
        above = watch.followers(ids)
        withholding = time.monotonic() < self._withheld_until
        standing_in = bool(above) and bool(watch.passed) and not withholding
        if standing_in != self._standing_in:
            self._standing_in = standing_in
            if standing_in:
                self.log(f"stage {stage_index}: this replica leads its averaging rounds, in place of "
                         f"{len(watch.passed)} silent replica(s)")
            elif above is None:
                self.log(f"stage {stage_index}: a lower replica leads the averaging rounds again")
        if above is None or withholding:
            return []
        chosen = set(above)
        return [r for r, i in zip(replicas, ids, strict=True) if i in chosen]

    def _round_due(self, steps_since: int, period: int) -> bool:
        """Whether to try a round `steps_since` steps after the last one (see the module docstring);
        only a stage's leader starts one, the others' tries return at once."""
        if steps_since <= 0:
            return False
        if steps_since >= period:
            return True
        if self._rounds_led:
            return time.monotonic() >= self._next_round_at
        return steps_since >= FIRST_ROUND_STEPS

    def _followed(self, result: RoundResult) -> None:
        """A round another replica led has ended here (on the loop)."""
        if not result.refused and self._watch is not None:
            self._watch.heard()
        self._round_done(self._stage_index, result)

    def _round_done(self, stage_index: int, result: RoundResult) -> None:
        self.trace.write("sync", stage=stage_index, round=result.round_id, leader=result.leader, step=self.steps,
                         participants=result.participants, agreed=result.agreed, digest=result.digest,
                         seconds=round(result.seconds, 4), **({"problems": result.problems} if result.problems else {}),
                         **({"outliers": result.outliers} if result.outliers else {}),
                         **({"refused": result.refused} if result.refused else {}))
        for peer in result.outliers:  # a faulty or lying replica: its update was clipped, not averaged
            self.log(f"stage {stage_index}: replica {peer[-8:]} sent an outlying pseudo-gradient; clipped")
            if peer != "self":
                self.counters.report_peer(peer, "outlier")
        if result.refused and not result.leader:  # a lying leader's outcome, refused (and reported)
            self.log(f"stage {stage_index}: {result.problems[0]}")
            return
        if result.refused:  # followers judged this replica's outcome implausible (problems say why)
            self.log(f"stage {stage_index}: {result.refused} replica(s) refused this round's outcome")
        if (result.agreed > 1 or not result.leader) and not self._sync_said:
            self._sync_said = True
            role = "led" if result.leader else "took part in"
            self.log(f"stage {stage_index} {role} an averaging round in {result.seconds:.2f}s; "
                     f"every {self._sync_period} step(s) from now on")

    async def _sync_rounds(self, assignment: pb.Assignment, executor: Callable[[], StageExecutor | None]) -> None:
        """Start the stage's averaging rounds when due (only its leader does), beside its driving or
        serving: neither waits on the network for a round, only for the lock's two short holds."""
        synced_at = 0
        started, first_steps = 0.0, None  # when our stage first stepped, and its step count then
        while True:
            await asyncio.sleep(SYNC_POLL_S)
            running = executor()
            if running is None:
                continue
            steps = running.stats.steps
            if steps < synced_at:  # a new executor (a driver rebuilt): count from its start
                synced_at = 0
            if steps > 0 and (first_steps is None or steps < first_steps):
                started, first_steps = time.monotonic(), steps
                if self._watch is not None:  # no round can come before our stage steps: wait from now
                    self._watch.restart()
            if first_steps is None:
                continue
            if self._round_due(steps - synced_at, self._sync_period):  # the period may change in place
                synced_at = steps
                step_s = (time.monotonic() - started) / max(1, steps - first_steps)
                await self._sync_round(assignment, running, step_s)

    async def _route(self, assignment: pb.Assignment, current: Route | None = None) -> tuple[Route | None, str]:
        """The stages after ours as GetSwarm lists them, or None (and why) while one has no replica.
        While the coordinator cannot be read, `current` stays the route: the pipeline trains on its
        lease through a coordinator outage (a dead replica in it is failed over by the picker)."""
        try:
            swarm = await self.fetch_swarm()
        except Exception as err:  # noqa: BLE001 - the coordinator may be away for a while
            return current, f"cannot read the swarm ({type(err).__name__})"
        stages = sorted(swarm.stages, key=lambda s: s.stage_index)
        if len(stages) != assignment.num_stages or not stages or (
                stages[0].layer_start, stages[0].layer_end) != self.span:
            return None, "the coordinator's plan is changing"
        replicas: dict[int, list[Replica]] = {s.stage_index: [] for s in stages[1:]}
        for worker in swarm.workers:
            if (worker.state == pb.WORKER_STATE_ACTIVE and worker.stage_index in replicas and worker.peer_id
                    and worker.peer_id != self.plane.peer_id):
                try:
                    peer = PeerID.from_base58(worker.peer_id)
                except Exception:  # noqa: BLE001 - a peer id we cannot read: skip that worker
                    continue
                replicas[worker.stage_index].append(Replica(peer, tuple(worker.multiaddrs)))
        empty = [i for i, found in replicas.items() if not found]
        if empty:
            return None, f"no replica yet for stage {', '.join(map(str, empty))}"
        return Route(tuple(
            StageRoute(s.stage_index, stage_key(self.run_id, s.stage_index, s.layer_start, s.layer_end),
                       tuple(replicas[s.stage_index]))
            for s in stages[1:]
        )), ""
