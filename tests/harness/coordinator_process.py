"""Start a real `coordinator` process on free ports and talk to it over real gRPC."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc

from configs.version import SOFTWARE_VERSION
from protos import swarmtrain_pb2 as pb
from protos import swarmtrain_pb2_grpc as pb_grpc
from tests.harness import processes

T = TypeVar("T")
READY = re.compile(r"coordinator ready · gRPC (\S+) ")


def wait_for(condition: Callable[[], T], timeout: float = 20.0, what: str = "condition", poll: float = 0.05) -> T:
    """Poll until `condition()` is truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


class CoordinatorProcess:
    """One coordinator subprocess; `stop()` (or the fixture) always reaps it."""

    def __init__(self, state_dir: Path, *extra: str, config: str = "tiny", namespace: str | None = None) -> None:
        """`namespace`: a network namespace to run in (tests/harness/natbed.py); a later --host wins."""
        self.state_dir = state_dir
        self.args = [
            *(["ip", "netns", "exec", namespace] if namespace else []), sys.executable, "-m", "coordinator.app.cli", "--config", config, "--host", "127.0.0.1",
            "--grpc-port", "0", "--dht-port", "0", "--metrics-port", "0", "--state-dir", str(state_dir),
            # every test client joins from 127.0.0.1: off unless a test sets it (a later --set wins)
            "--set", "coordinator.join_rate_per_address=0", *extra,
        ]
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        # in a session of its own: its DHT child and p2pd share the group, and kill() reaps them all
        self.proc = processes.start(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        threading.Thread(target=self._pump, daemon=True).start()
        self.endpoint = self._wait_ready()
        self.channel = grpc.insecure_channel(self.endpoint)
        self.stub = pb_grpc.CoordinatorStub(self.channel)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line)

    def _wait_ready(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError("coordinator exited early:\n" + self.output) from None
                continue
            match = READY.search(line)
            if match:
                return match.group(1)
        self.kill()
        raise TimeoutError("coordinator not ready in time:\n" + self.output)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def line_matching(self, pattern: str) -> str:
        return wait_for(lambda: next((l for l in self.lines if re.search(pattern, l)), None), what=pattern)

    def terminate(self, timeout: float = 20.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.kill()  # anything the process left behind in its group
        return code

    def kill_9(self) -> None:
        """SIGKILL the coordinator alone, as a crash would; its children are reaped by kill()."""
        self.proc.kill()
        self.proc.wait(10)

    def kill(self) -> None:
        processes.reap(self.proc)
        if hasattr(self, "channel"):
            self.channel.close()

    # ---- a minimal worker's side of the protocol ----------------------------------------

    def join(self, profile: pb.WorkerProfile | None = None, **fields: str) -> pb.JoinResponse:
        return self.stub.Join(pb.JoinRequest(profile=profile or make_profile(), **fields), timeout=10)

    def beat(self, joined: pb.JoinResponse, plan_version: int | None = None, **counters: float) -> pb.HeartbeatResponse:
        version = joined.assignment.plan_version if plan_version is None else plan_version
        return self.stub.Heartbeat(
            pb.HeartbeatRequest(worker_id=joined.worker_id, session_token=joined.session_token,
                                plan_version=version, counters=pb.Counters(**counters)),
            timeout=10,
        )

    def swarm(self) -> pb.GetSwarmResponse:
        return self.stub.GetSwarm(pb.GetSwarmRequest(), timeout=10)


def make_profile(
    memory_bytes: int = 8 * 2**30,
    achieved_flops: float = 5e12,
    bandwidth_bps: float = 1e9,
    name: str = "",
    version: str = SOFTWARE_VERSION,
) -> pb.WorkerProfile:
    return pb.WorkerProfile(
        software_version=version, gpu_name="NVIDIA GeForce RTX 3090", gpu_count=1, memory_bytes=memory_bytes,
        achieved_flops=achieved_flops, peak_flops=7.1e13, upload_bps=bandwidth_bps, download_bps=bandwidth_bps,
        public_name=name,
    )
