"""A whole swarm on this machine: a coordinator and several CPU workers on loopback.

    python deploy/local_swarm.py [--workers 4] [--seconds 60]

Starts `coordinator --config tiny` and N `worker --cpu` processes, each worker capped at
50 MiB so that no one of them can hold the tiny GPT-J alone: the coordinator splits it into
two pipeline stages with N/2 replicas each. Prints a live line (tokens/s, loss, workers per
stage) and, at the end, the tokens trained, tokens/s, the validation loss of the seed's
model and of the swarm's model (gathered from the live stages), and the bytes sent per
trained token. Every process it started is stopped on the way out, Ctrl-C included; the
logs stay in the folder it names.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

READY = re.compile(r"coordinator ready · gRPC (\S+) ")
WORKER_MEMORY = "50MiB"  # tiny peaks at ~57 MiB whole on a CPU: a worker this small must share the model
STATUS_EVERY_S = 2.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="local_swarm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4, help="CPU workers to start, 2 or more (default 4)")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="train this long once the pipeline runs (default 60)")
    parser.add_argument("--logs", type=Path, help="folder for the processes' logs (default: a new temporary one)")
    args = parser.parse_args(argv)
    if args.workers < 2:
        parser.error(f"--workers {args.workers}: a pipeline needs 2 or more")
    if not 0 < args.seconds <= 86_400:
        parser.error(f"--seconds {args.seconds:g}: must be more than 0 and at most a day")
    logs = args.logs or Path(tempfile.mkdtemp(prefix="swarmtrain-local-"))
    logs.mkdir(parents=True, exist_ok=True)
    swarm = LocalSwarm(logs, args.workers)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return swarm.run(args.seconds)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the swarm", flush=True)
        return 130
    finally:
        swarm.stop()
        signal.signal(signal.SIGTERM, previous)
        print(f"logs: {logs}", flush=True)


class LocalSwarm:
    def __init__(self, logs: Path, workers: int) -> None:
        self.logs, self.count = logs, workers
        self.coordinator: subprocess.Popen[str] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self._files: list[IO[bytes]] = []

    # ---- processes -----------------------------------------------------------------------

    def start_coordinator(self) -> str:
        command = [sys.executable, "-m", "coordinator.app.cli", "--config", "tiny", "--host", "127.0.0.1",
                   "--grpc-port", "0", "--dht-port", "0", "--metrics-port", "0",
                   "--state-dir", str(self.logs / "coordinator-state")]
        self.coordinator = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                            bufsize=1, start_new_session=True,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines: queue.Queue[str] = queue.Queue()
        log = (self.logs / "coordinator.log").open("w", encoding="utf-8")

        def pump() -> None:  # keep its log, and hand the lines to the wait below
            assert self.coordinator is not None and self.coordinator.stdout is not None
            for line in self.coordinator.stdout:
                log.write(line)
                log.flush()
                lines.put(line)
        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.25)
            except queue.Empty:
                if self.coordinator.poll() is not None:
                    raise SystemExit(f"error: the coordinator exited early; see {self.logs / 'coordinator.log'}")
                continue
            match = READY.search(line)
            if match:
                return match.group(1)
        raise SystemExit(f"error: the coordinator was not ready in 90 s; see {self.logs / 'coordinator.log'}")

    def start_workers(self, endpoint: str) -> None:
        # the workers share this machine's cores: one thread each keeps them from fighting
        threads = str(max(1, (os.cpu_count() or 1) // self.count))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads}
        for i in range(self.count):
            out = (self.logs / f"worker{i}.log").open("wb")
            self._files.append(out)
            command = [sys.executable, "-m", "worker.app.cli", "--cpu", "--coordinator", endpoint, "--host", "127.0.0.1",
                       "--max-memory", WORKER_MEMORY, "--link-mbps", "10000", "--public-name", f"local-{i}"]
            self.workers.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                                 start_new_session=True, env=env))

    def stop(self) -> None:
        """Workers first (they say goodbye to the coordinator), then the coordinator; nothing survives."""
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            _wait_or_kill(proc, 20)
        if self.coordinator is not None:
            if self.coordinator.poll() is None:
                self.coordinator.send_signal(signal.SIGTERM)
            _wait_or_kill(self.coordinator, 20)
        for file in self._files:
            file.close()

    # ---- the run -------------------------------------------------------------------------

    def run(self, seconds: float) -> int:
        import grpc

        from configs.loader import load_config
        from protos import swarmtrain_pb2 as pb
        from protos import swarmtrain_pb2_grpc as pb_grpc
        from worker.app.swarm_model import validation_losses

        print(f"starting a coordinator and {self.count} CPU workers on 127.0.0.1 (logs in {self.logs})", flush=True)
        endpoint = self.start_coordinator()
        self.start_workers(endpoint)
        channel = grpc.insecure_channel(endpoint)
        stub = pb_grpc.CoordinatorStub(channel)

        def view() -> pb.GetSwarmResponse:
            return stub.GetSwarm(pb.GetSwarmRequest(), timeout=10)

        started = time.monotonic()
        first: tuple[float, int] | None = None  # when tokens were first counted, and how many
        last_print = 0.0
        while True:
            self._check_workers()
            swarm = view()
            now = time.monotonic()
            progress = swarm.progress
            if first is None and progress.trained_tokens:
                first = (now, progress.trained_tokens)
            if now - last_print >= STATUS_EVERY_S:
                last_print = now
                print(status_line(swarm, now - started, first, now), flush=True)
            if first is not None and now - first[0] >= seconds:
                break
            if first is None and now - started > 180:
                raise SystemExit(f"error: no tokens trained after 180 s; see the logs in {self.logs}")
            time.sleep(0.5)

        final = view()
        print("measuring the validation loss of the swarm's model ...", flush=True)
        before, after = asyncio.run(validation_losses(final, load_config("tiny")))
        channel.close()
        assert first is not None
        elapsed = time.monotonic() - first[0]
        tokens = final.progress.trained_tokens
        rate = (tokens - first[1]) / elapsed if elapsed > 0 else 0.0
        print(summary(final, tokens, rate, before, after), flush=True)
        return 0

    def _check_workers(self) -> None:
        for i, proc in enumerate(self.workers):
            if proc.poll() is not None:
                raise SystemExit(f"error: worker {i} exited ({proc.returncode}); see {self.logs / f'worker{i}.log'}")


def status_line(swarm, elapsed: float, first: tuple[float, int] | None, now: float) -> str:
    from protos import swarmtrain_pb2 as pb

    stages = ", ".join(f"stage {s.stage_index}: {s.active_workers}" for s in swarm.stages) or "none planned yet"
    joined = sum(1 for w in swarm.workers if w.state == pb.WORKER_STATE_ACTIVE)
    clock = f"{int(elapsed) // 60}:{int(elapsed) % 60:02d}"
    if first is None:
        return f"{clock} · {joined} workers joined · stages: {stages} · waiting for the pipeline"
    progress = swarm.progress
    span = now - first[0]
    rate = (progress.trained_tokens - first[1]) / span if span > 0 else 0.0
    return (f"{clock} · {progress.trained_tokens:,} tokens · {rate:,.0f} tok/s · loss {progress.last_loss:.3f} · "
            f"workers per stage: {stages}")


def summary(swarm, tokens: int, rate: float, before: float, after: float) -> str:
    from protos import swarmtrain_pb2 as pb

    sent = {pb.TrafficKind.Name(t.kind).removeprefix("TRAFFIC_KIND_").lower(): t.sent_bytes
            for t in swarm.progress.traffic}
    total = sum(sent.values())
    kinds = ", ".join(f"{kind} {_mb(n)}" for kind, n in sent.items())
    layout = " + ".join(str(s.active_workers) for s in swarm.stages)
    return "\n".join([
        f"done: {tokens:,} tokens trained by {layout} workers in {len(swarm.stages)} stages · {rate:,.0f} tok/s",
        (f"loss: validation {before:.3f} (the seed's model) -> {after:.3f} (the swarm's) · "
        f"last training loss {swarm.progress.last_loss:.3f}"),
        f"traffic: {_mb(total)} sent ({kinds}) · {total / max(tokens, 1):,.0f} bytes per trained token",
    ])


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the swarm as Ctrl-C does


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _wait_or_kill(proc: subprocess.Popen, timeout: float) -> None:  # type: ignore[type-arg]
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # its whole session: p2p daemons included
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


if __name__ == "__main__":
    sys.exit(main())
