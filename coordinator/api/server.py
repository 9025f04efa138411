"""The coordinator process: gRPC server, health, reflection, DHT rendezvous, metrics, housekeeping.

Lifecycle: open the registry, bind gRPC, start the DHT and publish the rendezvous record,
mark health SERVING, then run until SIGTERM/SIGINT; on shutdown mark NOT_SERVING first,
drain in-flight RPCs, flush the registry.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from configs.schema import RunConfig
from configs.version import SOFTWARE_VERSION
from coordinator.api.data_files import DATA_PATH
from coordinator.api.dht import IDENTITY_FILE, RECORD_TTL_S, CoordinatorDHT, RendezvousRecord, ensure_identity
from coordinator.api.metrics import serve_metrics
from coordinator.api.ports import GRPC_EXCLUSIVE_OPTIONS, LIBP2P_REUSEPORT_ENV, busy_port_message, port_taken
from coordinator.api.service import CoordinatorService, strict_handlers, swarm_view
from coordinator.api.status import StatusBoard
from coordinator.storage.pretrained_source import PretrainedSource
from coordinator.storage.registry import Registry
from coordinator.storage.state_lock import StateDirLock
from coordinator.swarm.orchestrator import Swarm
from coordinator.swarm.summary import SUMMARY_INTERVAL_S, SwarmSnapshot, count_by_stage, summary_line
from protos import swarmtrain_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
MAX_MESSAGE_BYTES = 256 * 1024  # control-plane messages are small; anything bigger is refused
FLUSH_INTERVAL_S = 1.0
DRAIN_GRACE_S = 5.0
STATUS_INTERVAL_S = 1.0  # how stale /status.json may be


@dataclass(frozen=True)
class TlsFiles:
    cert: bytes
    key: bytes


@dataclass(frozen=True)
class Endpoints:
    grpc: str
    metrics_url: str
    dht_multiaddrs: list[str]


class CoordinatorServer:
    def __init__(self, config: RunConfig, *, tls: TlsFiles | None = None, dht_initial_peers: list[str] | None = None,
                 announce_host: str | None = None) -> None:
        self.config = config
        self.tls = tls
        self.dht_initial_peers = dht_initial_peers or []
        self.announce_host = announce_host
        # the checkpoint a run starts from, checked before anything is locked or written
        # (configs.pretrained.PretrainedError says in one line why it cannot be)
        self.pretrained = (PretrainedSource(config.model, config.coordinator.state_dir)
                           if config.model.pretrained is not None else None)
        # before the registry opens: a second coordinator on this state dir stops here
        self.state_lock = StateDirLock(config.coordinator.state_dir)
        self.state_lock.acquire()
        self.registry = Registry(config.coordinator.state_dir, config.coordinator.run_id, config.fingerprint())
        self.swarm = Swarm(config, self.registry)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.dht: CoordinatorDHT | None = None
        self._metrics_server: object | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.status = StatusBoard()  # /status and /status.json, refreshed every STATUS_INTERVAL_S
        self.endpoints: Endpoints | None = None
        self._said_complete = False

    async def start(self) -> Endpoints:
        c = self.config.coordinator
        # The DHT forks a child process: start it before gRPC's threads exist.
        identity = Path(c.state_dir) / IDENTITY_FILE
        ensure_identity(identity)  # an unreadable key is the operator's to move: IdentityError says so
        for port, flag, what in ((c.dht_port, "--dht-port", "the DHT"), (c.grpc_port, "--grpc-port", "gRPC"),
                                 (c.metrics_port, "--metrics-port", "metrics")):
            if port_taken(c.host, port):
                raise OSError(busy_port_message(c.host, port, flag, what))
        os.environ[LIBP2P_REUSEPORT_ENV] = "false"  # the P2P daemon inherits it: our DHT port is ours alone
        try:
            self.dht = CoordinatorDHT(c.host, c.dht_port, self.dht_initial_peers, identity)
        except Exception as err:  # hivemind reports a busy port or a bad peer in many types
            raise OSError(f"cannot start the DHT on {c.host}:{c.dht_port} ({err}): "
                          "pick another --dht-port or check --initial-peers") from None
        dht_addrs = self.dht.multiaddrs()
        self.announce_host = self.announce_host or _announce_host(c.host, dht_addrs)
        self.server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", 16 * MAX_MESSAGE_BYTES), *GRPC_EXCLUSIVE_OPTIONS],
        )
        service = CoordinatorService(self.swarm, self.pretrained)
        self.server.add_generic_rpc_handlers((strict_handlers(service),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        address = f"{c.host}:{c.grpc_port}"
        try:
            if self.tls:
                credentials = grpc.ssl_server_credentials([(self.tls.key, self.tls.cert)])
                port = self.server.add_secure_port(address, credentials)
            else:
                port = self.server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if port == 0:  # taken since the check above
            raise OSError(busy_port_message(c.host, c.grpc_port, "--grpc-port", "gRPC"))
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

        try:
            self._publish_status()
            _, metrics_port, self._metrics_server = serve_metrics(self.swarm, c.host, c.metrics_port, self.status)
        except OSError as err:
            raise OSError(f"cannot serve metrics on {c.host}:{c.metrics_port} ({err.strerror}): "
                          "pick another with --metrics-port") from None
        grpc_endpoint = f"{self.announce_host}:{port}"
        if self.swarm.config.data.prepared is not None:
            service.data_url = self.swarm.config.data.url or f"http://{self.announce_host}:{metrics_port}{DATA_PATH}"
        self.record = RendezvousRecord(grpc_endpoint, self.swarm.config_hash, SOFTWARE_VERSION, self.tls is not None)
        await self.dht.publish(c.run_id, self.record)

        # Workers could reach us only since server.start(): time them out from now, not from when
        # the registry loaded (the DHT's start in between can outlast the heartbeat timeout).
        self.swarm.restart_clocks()
        self.swarm.replan()  # a restart may find workers gone while it was down
        self._tasks = [
            asyncio.create_task(_every(c.heartbeat_interval_s, self._sweep)),
            asyncio.create_task(_every(FLUSH_INTERVAL_S, self._flush)),
            asyncio.create_task(_every(10 * c.heartbeat_interval_s, self._check_drift)),
            asyncio.create_task(_every(RECORD_TTL_S / 3, self._republish)),
            asyncio.create_task(_every(SUMMARY_INTERVAL_S, self._summary)),
            asyncio.create_task(_every(STATUS_INTERVAL_S, self._refresh_status)),
        ]
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.endpoints = Endpoints(
            grpc=grpc_endpoint,
            metrics_url=f"http://{self.announce_host}:{metrics_port}/metrics",
            dht_multiaddrs=dht_addrs,
        )
        return self.endpoints

    async def _sweep(self) -> None:
        self.swarm.sweep()
        final = self.swarm.final_checkpoint()
        if final is not None and not self._said_complete:  # once, as soon as the run is complete
            self._said_complete = True
            print(self.swarm.checkpointing.completion(final, self.swarm.registry.progress.trained_tokens)
                  + "; workers are told to leave", flush=True)

    async def _refresh_status(self) -> None:
        self._publish_status()

    def _publish_status(self) -> None:
        """The swarm page's data, built here on the loop, where the swarm changes."""
        self.status.publish(swarm_view(self.swarm), time.time())

    async def _flush(self) -> None:
        self.registry.flush()

    async def _summary(self) -> None:
        """One line for the operator while workers are around; silence while nobody is."""
        swarm = self.swarm
        active = swarm.registry.active()
        final = swarm.final_checkpoint()
        if not active:
            return
        progress = swarm.registry.progress
        print(summary_line(SwarmSnapshot(
            active_by_stage=count_by_stage([r.stage_index for r in active]),
            tokens_per_second=swarm.measured_tokens_per_second(), trained_tokens=progress.trained_tokens,
            total_tokens=self.config.training.total_tokens,
            loss=progress.last_loss if progress.loss_count else math.nan,
            usd_per_hour=swarm.cost.rates.usd_per_hour, usd_spent=swarm.cost.usd, complete=final is not None)),
            flush=True)

    async def _check_drift(self) -> None:
        self.swarm.check_drift()

    async def _republish(self) -> None:
        assert self.dht is not None
        await self.dht.publish(self.config.coordinator.run_id, self.record)

    async def stop(self) -> None:
        """Drain: NOT_SERVING first so balancers stop sending, then finish in-flight RPCs."""
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.server:
            await self.server.stop(DRAIN_GRACE_S)
        self.registry.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()  # type: ignore[attr-defined]
            self._metrics_server.server_close()  # type: ignore[attr-defined]
        if self.dht:
            await asyncio.to_thread(self.dht.shutdown)
        self.state_lock.release()


async def run_until_signalled(server: CoordinatorServer, on_ready: Callable[[Endpoints], None]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        on_ready(await server.start())
        await stop.wait()
    finally:
        await server.stop()


async def _every(interval_s: float, job: Callable[[], Awaitable[None]]) -> None:
    """Run `job` every `interval_s`; one failure is reported, not fatal to the loop."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await job()
        except Exception as err:  # noqa: BLE001 - housekeeping must outlive a bad tick
            print(f"warning: {job.__name__}: {err}", flush=True)


def _announce_host(host: str, dht_multiaddrs: list[str]) -> str:
    """The address to tell others: the listening one, or when listening on all interfaces,
    the first non-loopback address the DHT sees for this machine."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    for addr in dht_multiaddrs:
        parts = addr.split("/")
        if len(parts) > 2 and parts[1] == "ip4" and not parts[2].startswith("127."):
            return parts[2]
    return "127.0.0.1"
