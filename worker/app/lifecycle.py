"""A swarm worker's life: probe, find the coordinator, join, serve the assigned stage, leave.

What the worker runs for its assignment is a `StageRuntime` (worker/app/stage_runtime.py);
the lifecycle only tells it when to start, switch and stop, through an `AssignmentApplier`.
With --trace, its turns are events beside the lines: assigned, waiting, and how it exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from configs.link import Link
from configs.loader import ConfigError, validate_tree
from configs.pretrained import PretrainedCheckpoint, PretrainedError
from configs.schema import RunConfig
from configs.version import SOFTWARE_VERSION
from protos import swarmtrain_pb2 as pb
from worker.app.applier import AssignmentApplier
from worker.app.control_client import CoordinatorSession, HeartbeatOutcome
from worker.app.descriptions import assigned_event, describe_assignment
from worker.app.device import DeviceError, resolve_device
from worker.app.discovery import discover_coordinator
from worker.app.hardware import probe_hardware, to_profile
from worker.app.local_pretrained import check_local_copy, open_local_copy
from worker.app.metrics import WorkerState, serve_worker_metrics
from worker.app.rpc_errors import USER_MISTAKE, CoordinatorError
from worker.app.stage_runtime import Log, RuntimeFactory, StageRuntime
from worker.app.status import STATUS_INTERVAL_S, status_line
from worker.data.shard_cache import ShardSource
from worker.telemetry.counters import CounterBook
from worker.telemetry.trace import Trace

T = TypeVar("T")


class WorkerFailure(Exception):
    """Ends the worker with one line: `prefix: message`, exit `exit_code`."""

    def __init__(self, message: str, *, exit_code: int = 1, prefix: str = "error") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.prefix = prefix


@dataclass(frozen=True)
class SwarmOptions:
    """The volunteer's command line, checked (worker/app/cli.py)."""

    gpu: int | None
    cpu: bool
    peers: list[str]  # empty when `coordinator` is given
    coordinator: str | None  # host:port; skips the DHT rendezvous
    run_id: str | None
    host: str  # where the data plane will listen; not used by the control plane
    join_token: str
    metrics_port: int | None  # this worker's /metrics; None or 0 picks a free port
    public_name: str
    max_memory_bytes: int | None
    link_mbps: float | None
    trace: Path | None = None  # --trace FILE: what the worker does, as JSON lines (telemetry/trace.py)
    lie_scale: float | None = None  # --lie-scale: a deliberately faulty replica, for resilience tests
    withhold_rounds_s: float = 0.0  # --withhold-rounds: a replica that withholds the rounds it should lead, likewise
    identity: Path | None = None  # --identity FILE: the data plane's private key, kept across restarts
    pretrained: Path | None = None  # --pretrained DIR: a local copy of the run's starting checkpoint
    data_cache: ShardSource = ShardSource()  # --data-cache DIR, --data-cache-size SIZE: fetched prepared data
    public_addr: tuple[str, int] | None = None  # --public-addr HOST:PORT: a forwarded port to listen on and announce


# ---- the lifecycle ----------------------------------------------------------------------


def _quiet_role_change_races(loop: asyncio.AbstractEventLoop, log: Log) -> None:
    """One line, not a traceback, for a peer's stream that arrives for a handler this worker has
    just removed (it changed role or stage); the caller sees the refusal and goes elsewhere."""
    from hivemind.p2p.p2p_daemon_bindings.utils import DispatchFailure

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        err = context.get("exception")
        if isinstance(err, DispatchFailure):
            log(f"a peer called {err} after this worker stopped serving it (a role change); refused")
            return
        loop.default_exception_handler(context)
    loop.set_exception_handler(handle)


async def run_swarm_worker(
    options: SwarmOptions, log: Log, runtime_factory: RuntimeFactory | None = None
) -> int:
    """Serve the swarm until SIGINT/SIGTERM (exit 0), DRAIN (0) or an expired lease (1).
    Problems the volunteer must see raise WorkerFailure.

    Without `runtime_factory` the worker trains (worker.runtime.training): it starts its P2P
    daemon on `options.host` before joining and advertises its peer id and addresses. Either
    way the trace ends with an `exit` event: the code, and the one line the volunteer sees."""
    trace = Trace(options.trace)
    try:
        code = await _live(options, log, runtime_factory, trace)
    except WorkerFailure as failure:
        trace.write("exit", code=failure.exit_code, message=f"{failure.prefix}: {failure}")
        raise
    trace.write("exit", code=code, message="")
    return code


async def _live(options: SwarmOptions, log: Log, runtime_factory: RuntimeFactory | None, trace: Trace) -> int:
    stop = asyncio.Event()
    why: list[str] = []
    loop = asyncio.get_running_loop()
    _handle_stop_signals(loop, stop, why, log, trace)
    _quiet_role_change_races(loop, log)

    try:
        device = resolve_device(options.gpu, options.cpu)
    except DeviceError as err:
        raise WorkerFailure(str(err), exit_code=USER_MISTAKE) from None
    try:
        local_copy = open_local_copy(options.pretrained) if options.pretrained is not None else None
    except PretrainedError as err:
        raise WorkerFailure(str(err), prefix="config error", exit_code=USER_MISTAKE) from None
    report = probe_hardware(device, max_memory_bytes=options.max_memory_bytes, link_mbps=options.link_mbps)
    log(f"hardware: {report.description}")

    if stop.is_set():  # asked to stop while measuring
        return 0
    tls = False
    if options.coordinator:
        endpoint = options.coordinator
    else:
        log(f"finding the coordinator through {len(options.peers)} DHT peer(s)…")
        try:
            found = await _unless_stopped(stop, discover_coordinator(options.peers, options.run_id))
        except CoordinatorError as err:
            raise WorkerFailure(str(err), exit_code=err.exit_code) from None
        if found is None:
            return 0
        endpoint, record = found
        tls = record.tls
        log(f"coordinator: {endpoint} · config {record.config_hash} · swarmtrain {record.software_version}")

    plane = None
    if runtime_factory is None:
        from worker.runtime.training import DataPlane  # hivemind loads only for training

        try:
            plane = await _unless_stopped(stop, DataPlane.start(options.host, options.identity, options.public_addr))
        except Exception as err:  # noqa: BLE001 - the daemon's own one-line reason
            problem = (str(err).splitlines() or [type(err).__name__])[0]
            raise WorkerFailure(f"cannot start the data plane on --host {options.host}: {problem}") from None
        if plane is None:
            return 0
        log(f"data plane: peer {plane.peer_id} · {' '.join(plane.multiaddrs)}")
    counters = CounterBook()
    price, watts = _catalog_figures(report)
    state = WorkerState(device, report.gpu_name, report.peak_flops, usd_per_hour=price, public_name=options.public_name,
                        board_watts=watts)
    metrics_server: Any = None
    try:
        metrics_endpoint, metrics_server = _serve_metrics(counters, state, options.host, options.metrics_port)
        log(f"metrics: http://{metrics_endpoint}/metrics")
        profile = to_profile(report, SOFTWARE_VERSION, options.public_name,
                             peer_id=plane.peer_id if plane else "",
                             multiaddrs=list(plane.multiaddrs) if plane else [], metrics_endpoint=metrics_endpoint)
        session = CoordinatorSession(endpoint, profile, join_token=options.join_token, tls=tls, log=log,
                                     trace=trace)
        factory = runtime_factory or _training_factory(plane, session, loop, trace, options.lie_scale,
                                                          options.withhold_rounds_s, report.link, local_copy,
                                                          options.data_cache)
        try:
            return await _serve(session, device, stop, why, log, factory, counters, state)
        except CoordinatorError as err:
            raise WorkerFailure(str(err), exit_code=err.exit_code) from None
        finally:
            await session.close()
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        if plane is not None:
            with contextlib.suppress(Exception):
                await plane.shutdown()


def _catalog_figures(report: Any) -> tuple[float, float]:
    """This GPU's hourly price and board power in the catalog (what the swarm's dashboards count
    it at); 0 for a CPU."""
    from configs.catalog import load_catalog

    spec = load_catalog().match_device_name(report.gpu_name) if report.gpu_name else None
    gpus = max(1, report.gpu_count)
    return (spec.usd_per_hour * gpus, spec.board_power_watts * gpus) if spec is not None else (0.0, 0.0)


def _serve_metrics(counters: CounterBook, state: WorkerState, host: str, port: int | None) -> tuple[str, Any]:
    """This worker's /metrics on host (port 0 or None: a free one); its host:port and the server."""
    try:
        bound, server = serve_worker_metrics(counters, state, host, port or 0)
    except OSError as err:
        raise WorkerFailure(f"cannot serve metrics on {host}:{port or 0} ({err.strerror or err}): "
                            "pick another with --metrics-port") from None
    return f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}", server


def _training_factory(plane: Any, session: CoordinatorSession, loop: asyncio.AbstractEventLoop,
                      trace: Trace, lie_scale: float | None = None, withhold_rounds_s: float = 0.0,
                      link: Link | None = None, local_copy: PretrainedCheckpoint | None = None,
                      data_cache: ShardSource = ShardSource()) -> RuntimeFactory:
    """TrainingRuntimes on `plane`, finding the other stages through the coordinator's GetSwarm."""
    from worker.runtime.checkpoint_format import CheckpointLink
    from worker.runtime.training import TrainingRuntime

    def fetch_swarm() -> Awaitable[pb.GetSwarmResponse]:
        return session.stub.GetSwarm(pb.GetSwarmRequest(), timeout=session.rpc_timeout_s)

    def build(config: RunConfig, device: torch.device, counters: CounterBook, log: Log) -> StageRuntime:
        if local_copy is not None:
            try:
                check_local_copy(local_copy, session.pretrained_fingerprint, config)
            except PretrainedError as err:
                raise WorkerFailure(str(err), prefix="config error", exit_code=USER_MISTAKE) from None
            session.has_pretrained = True
        return TrainingRuntime(config, device, counters, log, plane=plane, loop=loop,
                               run_id=session.run_id or config.coordinator.run_id, fetch_swarm=fetch_swarm,
                               trace=trace, checkpoints=CheckpointLink(session.save_checkpoint,
                                                                       session.load_checkpoint),
                               lie_scale=lie_scale, withhold_rounds_s=withhold_rounds_s, link=link,
                               pretrained=local_copy, data_source=replace(data_cache, url=session.data_url))

    return build


async def _serve(session: CoordinatorSession, device: torch.device, stop: asyncio.Event, why: list[str],
                 log: Log, runtime_factory: RuntimeFactory, counters: CounterBook, state: WorkerState) -> int:
    joined = await _unless_stopped(stop, session.join())
    if joined is None:
        return 0
    try:
        config = run_config_from(joined)
        runtime = runtime_factory(config, device, counters, log)
    except WorkerFailure:
        await session.leave("cannot use the run config")  # free the stage at once
        raise
    applier = AssignmentApplier(runtime)
    n_layer, state.worker_id = config.model.n_layer, session.worker_id

    def on_assignment(assignment: pb.Assignment) -> None:
        log(describe_assignment(assignment, session.worker_id, n_layer))
        session.trace.write("assigned", **assigned_event(assignment, session.worker_id))
        state.stage = assignment.stage_index
        applier.submit(assignment)

    def on_waiting(status: str) -> None:
        log(f"waiting: {status} · worker {session.worker_id}")
        session.trace.write("waiting", worker_id=session.worker_id, reason=status)
        state.stage, state.waiting = -1, status
        applier.submit(None)

    def on_checkpoint(request: pb.CheckpointRequest) -> None:
        save = getattr(applier.runtime, "request_checkpoint", None)  # runtimes that train can save
        if save is not None:
            save(request)

    if session.assignment is not None:
        on_assignment(session.assignment)
    else:
        on_waiting(session.status or "no stage for this worker yet")
    # a runtime that fails (e.g. out of memory building its stage) ends the session too
    watcher = asyncio.create_task(_set_when(applier.failed, stop))
    status = asyncio.create_task(_report_status(counters, state, log))
    try:
        outcome = await session.run_heartbeats(counters, on_assignment, on_waiting=on_waiting, stop=stop,
                                               on_checkpoint=on_checkpoint)
    finally:
        watcher.cancel()
        status.cancel()
        await applier.close()
    if applier.failure is not None:
        problem = (str(applier.failure).splitlines() or [type(applier.failure).__name__])[0]
        await session.leave(f"stage failed: {problem}")
        raise WorkerFailure(f"the stage failed: {problem}", prefix="stage error")
    if outcome is HeartbeatOutcome.LEASE_EXPIRED:
        raise WorkerFailure(f"the coordinator at {session.endpoint} stayed unreachable until this worker's "
                            "lease ended: stopping (restart the worker to rejoin)")
    if outcome is HeartbeatOutcome.DRAIN:
        reason = "drain requested by the coordinator"
    elif outcome is HeartbeatOutcome.COMPLETE:
        log(session.status)
        session.trace.write("complete", worker_id=session.worker_id, status=session.status)
        reason = "the run is complete"
    else:
        reason = why[0] if why else "stop"
    if await session.leave(reason):
        log(f"left the swarm ({reason})")
    else:
        log(f"stopped ({reason}); the coordinator will time this worker out")
    return 0


async def _report_status(counters: CounterBook, state: WorkerState, log: Log) -> None:
    """A status line every STATUS_INTERVAL_S while the worker has a stage."""
    before, then = counters.totals(), time.monotonic()
    while True:
        await asyncio.sleep(STATUS_INTERVAL_S)
        now, at = counters.totals(), time.monotonic()
        if state.stage >= 0:
            log(status_line(state.stage, before, now, at - then, counters.last_loss, state.usd_per_hour))
        before, then = now, at


def run_config_from(joined: pb.JoinResponse) -> RunConfig:
    """The run config the coordinator sent, checked like a local one."""
    source = f"run {joined.run_id or '?'} (from the coordinator)"
    try:
        tree = json.loads(joined.run_config_json)
    except ValueError:
        raise WorkerFailure(f"{source}: not valid JSON", prefix="config error") from None
    if not isinstance(tree, dict):
        raise WorkerFailure(f"{source}: expected a mapping of sections", prefix="config error")
    try:
        config = validate_tree(tree, source)
    except ConfigError as err:
        raise WorkerFailure(str(err), prefix="config error") from None
    wanted = joined.assignment.config_hash if joined.HasField("assignment") else ""
    if wanted and config.fingerprint() != wanted:
        # the same JSON read differently here: this worker would train another model
        raise WorkerFailure(
            f"{source}: hashes to {config.fingerprint()} here but {wanted} at the coordinator: "
            f"install the coordinator's swarmtrain version",
            prefix="config error", exit_code=USER_MISTAKE,
        )
    return config


async def _unless_stopped(stop: asyncio.Event, awaitable: Awaitable[T]) -> T | None:
    """The awaitable's result, or None once `stop` fired first (the work is cancelled) or the work
    failed after it fired."""
    work = asyncio.ensure_future(awaitable)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if work.done():
        # a failure once stop is set is the stop's doing too: a Ctrl-C reaches the whole process
        # group, the DHT's and the data plane's daemons included, and their start fails with it
        if stop.is_set() and not work.cancelled() and work.exception() is not None:
            return None
        return work.result()
    work.cancel()
    # let it clean up (the DHT client shuts down); what it raises on being cancelled (hivemind's
    # "Daemon failed to start") is the stop's doing, not news for the volunteer
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await work
    return None


def _handle_stop_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event, why: list[str], log: Log,
                         trace: Trace) -> None:
    """SIGINT and SIGTERM ask the worker to leave the swarm in order; a second Ctrl-C exits at once
    (the guard takes the P2P daemons and the DHT process with it: configs/process_guard.py).

    Plain signal handlers rather than the loop's: they run whenever the main thread runs Python,
    also while it is busy outside the loop, and they hand the stop to the loop thread-safely."""
    def on_signal(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if (why and signum == signal.SIGINT) or loop.is_closed():
            os.write(2, b"\ninterrupted again: exiting at once\n" if why else b"\ninterrupted\n")
            os._exit(130)
        if why:
            return  # a repeated SIGTERM: already leaving
        why.append(name)
        loop.call_soon_threadsafe(_stopping, stop, name, log, trace)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)


def _stopping(stop: asyncio.Event, name: str, log: Log, trace: Trace) -> None:
    again = "; press Ctrl-C again to exit at once" if name == "SIGINT" else ""
    log(f"stopping ({name}): leaving the swarm{again}")
    trace.write("stopping", signal=name)
    stop.set()


async def _set_when(event: asyncio.Event, target: asyncio.Event) -> None:
    await event.wait()
    target.set()
