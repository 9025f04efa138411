"""Soak benchmark: a swarm that loses a worker every --kill-every seconds keeps training.

    python tests/benchmarks/bench_soak.py [--minutes 10] [--kill-every 30] [--restart-after 10] \
        [--seed 0] [--workers 6] [--out results.json]

A coordinator and --workers CPU workers on 127.0.0.1 train the tiny GPT-J, each worker capped
at 50 MiB so that they form a pipeline with replicas (2 stages x 3 with 6 workers). Two runs:

  faulty      for --minutes from the first trained step, a worker picked at random (--seed) is
              SIGKILLed (its P2P daemon too) every --kill-every seconds and started again with
              the same command line --restart-after seconds later (tests/harness/faults.py,
              its schedule keyed on seconds of training);
  fault-free  the same swarm, no faults, until it has trained as many tokens as the faulty run.

Reported per run: tokens trained and tokens/s; the longest gap between two stage-0 steps (the
drivers' --trace files: training never stops); the longest time any planned stage had no live
worker serving it (GetSwarm polled every 0.5 s; a worker counts as serving while the
coordinator lists it active and its process is alive); kills and restarts; processes that
were not killed but crashed (exited, or wrote "Traceback"); the validation loss of the swarm's
model gathered from the live stages (worker.app.swarm_model) at the run's end. The verdict checks
the resilience issue's bar: no stage-0 stall and no stage unserved for more than 30 s, no
crash, and the faulty run's validation loss within 5% of the fault-free run's at the same
tokens. Prints a table; writes JSON to tests/benchmarks/results/soak.json unless --out says
otherwise; the processes' logs stay in the folder it names. Every process it started is
stopped on the way out, Ctrl-C included. Not part of the default test run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "tests" / "benchmarks" / "results"
POLL_S = 0.5
STARTUP_LIMIT_S = 240.0
STALL_LIMIT_S = 30.0  # the bar: no stage unserved, and no stage-0 stall, for longer
LOSS_TOLERANCE = 0.05
# heartbeats as in the integration tests: a dead worker is noticed in 5 s; a lease outlives it
COORDINATOR_FLAGS = ["--set", "coordinator.heartbeat_interval_s=0.5", "--set", "coordinator.heartbeat_timeout_s=5",
                     "--set", "coordinator.lease_s=60", "--set", "coordinator.checkpoint_interval_s=60"]
WORKER_FLAGS = ["--host", "127.0.0.1", "--max-memory", "50MiB", "--link-mbps", "10000"]
WORKER_ID = re.compile(r"worker (w-[0-9a-f]+)$")


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def kill_schedule(seconds: float, every: float, restart_after: float, workers: int, seed: int) -> list[Any]:
    """Kill a random worker at every multiple of `every` within `seconds`, restart it `restart_after` later.
    Keyed on whole seconds of training (the injector's progress)."""
    from tests.harness.faults import Fault

    rng = random.Random(seed)
    faults = []
    at = every
    while at <= seconds:
        victim = rng.randrange(workers)
        faults += [Fault(int(at), "kill", victim), Fault(int(at + restart_after), "restart", victim)]
        at += every
    return faults


@dataclass
class Monitor:
    """What one run's polls saw: when each stage last had a live server, and the longest outage."""

    unserved_since: dict[int, float] = field(default_factory=dict)
    longest_unserved_s: float = 0.0
    worst_stage: int | None = None

    def observe(self, now: float, planned: list[int], served: set[int]) -> None:
        for stage in planned:
            if stage in served:
                self.unserved_since.pop(stage, None)
                continue
            since = self.unserved_since.setdefault(stage, now)
            if now - since > self.longest_unserved_s:
                self.longest_unserved_s, self.worst_stage = now - since, stage


class SoakRun:
    """One swarm: a coordinator, `count` workers, optional faults. `close()` reaps everything."""

    def __init__(self, name: str, logs: Path, count: int) -> None:
        from tests.harness.coordinator_process import CoordinatorProcess

        self.name, self.logs, self.count = name, logs / name, count
        self.logs.mkdir(parents=True, exist_ok=True)
        self.traces = [self.logs / f"worker{i}.jsonl" for i in range(count)]
        self.processes: list[Any] = []  # every worker process started, replacements included
        self.closed = False
        self.coordinator = CoordinatorProcess(self.logs / "state", *COORDINATOR_FLAGS)
        self.slots = [self.spawn(i) for i in range(count)]  # the live process of each worker slot

    def spawn(self, slot: int) -> Any:
        from tests.harness.worker_process import WorkerProcess

        worker = WorkerProcess("--coordinator", self.coordinator.endpoint, *WORKER_FLAGS,
                               "--public-name", f"soak-{slot}", "--trace", str(self.traces[slot]))
        worker.slot = slot  # type: ignore[attr-defined]
        self.processes.append(worker)
        return worker

    def steps(self) -> list[float]:
        """Times of every stage-0 step so far, sorted."""
        from worker.telemetry.trace import read_trace

        return sorted(e["time"] for p in self.traces if p.exists() for e in read_trace(p) if e["event"] == "step")

    def served_stages(self, swarm: Any) -> set[int]:
        """Stages with a worker the coordinator lists active and whose process is alive."""
        from protos import swarmtrain_pb2 as pb

        alive = set()
        for worker in self.processes:
            if worker.proc.poll() is None:
                ids = [m.group(1) for m in map(WORKER_ID.search, list(worker.lines)) if m]
                alive.update(ids[-1:])
        return {w.stage_index for w in swarm.workers
                if w.state == pb.WORKER_STATE_ACTIVE and w.worker_id in alive and w.stage_index >= 0}

    def run(self, *, seconds: float | None, target_tokens: int | None, faults: list[Any],
            limit_s: float) -> dict[str, Any]:
        from configs.loader import load_config
        from tests.harness.faults import FaultInjector
        from worker.app.swarm_model import validation_losses

        started = time.monotonic()
        while not self.steps():
            self._check_coordinator()
            if time.monotonic() - started > STARTUP_LIMIT_S:
                raise SystemExit(f"error: no step trained in {STARTUP_LIMIT_S:.0f} s; see the logs in {self.logs}")
            time.sleep(POLL_S)
        t0, wall0 = time.monotonic(), time.time()
        tokens0 = self.coordinator.swarm().progress.trained_tokens
        injector = FaultInjector(faults, self.slots, progress=lambda: int(time.monotonic() - t0),
                                 respawn=self.spawn)
        monitor = Monitor()
        last_print = 0.0
        while True:
            for fired in injector.poll():
                progress(f"  ({self.name}) {fired.step:4d} s · {fired.fault.action} worker {fired.fault.worker}")
            self._check_coordinator()
            swarm = self.coordinator.swarm()
            now = time.monotonic()
            monitor.observe(now, [s.stage_index for s in swarm.stages], self.served_stages(swarm))
            tokens = swarm.progress.trained_tokens
            if now - last_print >= 15:
                last_print = now
                layout = "+".join(str(s.active_workers) for s in swarm.stages)
                progress(f"  ({self.name}) {now - t0:4.0f} s · {tokens:,} tokens · "
                         f"loss {swarm.progress.last_loss:.3f} · workers per stage {layout}")
            if seconds is not None and now - t0 >= seconds:
                break
            if target_tokens is not None and tokens >= target_tokens:
                break
            if now - t0 > limit_s:
                progress(f"  ({self.name}) stopped at the {limit_s:.0f} s limit short of {target_tokens:,} tokens")
                break
            time.sleep(POLL_S)
        elapsed = time.monotonic() - t0
        final = self.coordinator.swarm()
        tokens = final.progress.trained_tokens
        progress(f"  ({self.name}) measuring the validation loss of the swarm's model at {tokens:,} tokens")
        seed_val, val = asyncio.run(validation_losses(final, load_config("tiny")))
        steps = [t for t in self.steps() if t >= wall0]
        end = time.time()
        gaps = [b - a for a, b in itertools.pairwise(steps)] + ([end - steps[-1]] if steps else [])
        killed = {f.pid for f in injector.fired if f.fault.action == "kill"}
        crashes = self._stop_survivors(killed)
        return {
            "run": self.name,
            "seconds": round(elapsed, 1),
            "tokens": tokens,
            "tokens_in_window": tokens - tokens0,
            "tokens_per_s": round((tokens - tokens0) / elapsed, 1) if elapsed > 0 else 0.0,
            "stage0_steps": len(steps),
            "longest_step_gap_s": round(max(gaps, default=elapsed), 2),
            "longest_unserved_s": round(monitor.longest_unserved_s, 2),
            "worst_stage": monitor.worst_stage,
            "kills": sum(f.fault.action == "kill" for f in injector.fired),
            "restarts": sum(f.fault.action == "restart" for f in injector.fired),
            "faults": [{"second": f.step, "action": f.fault.action, "worker": f.fault.worker, "pid": f.pid}
                       for f in injector.fired],
            "crashes": crashes,
            "seed_val_loss": round(seed_val, 4),
            "val_loss": round(val, 4),
            "layout": [s.active_workers for s in final.stages],
        }

    def _check_coordinator(self) -> None:
        if self.coordinator.proc.poll() is not None:
            raise SystemExit(f"error: the coordinator exited ({self.coordinator.proc.returncode}); see {self.logs}")

    def _stop_survivors(self, killed: set[int]) -> list[str]:
        """SIGTERM every process that was not killed on purpose; each that had died, failed to
        leave with exit 0, or wrote a traceback is a crash."""
        crashes = []
        for worker in self.processes:
            if worker.proc.pid in killed:
                continue
            if worker.proc.poll() is not None:
                crashes.append(f"worker slot {worker.slot} pid {worker.proc.pid}: exited {worker.proc.returncode}")
                continue
            try:
                code, _ = worker.terminate(timeout=20)
            except Exception:  # noqa: BLE001 - it hung: a crash for this benchmark
                code = None
            if code != 0:
                crashes.append(f"worker slot {worker.slot} pid {worker.proc.pid}: SIGTERM gave {code}")
        crashes += [f"worker slot {w.slot} pid {w.proc.pid}: Traceback in its output"
                    for w in self.processes if w.proc.pid not in killed and "Traceback" in w.output]
        code = self.coordinator.terminate()
        if code != 0 or "Traceback" in self.coordinator.output:
            crashes.append(f"coordinator: exit {code}" + (" with a Traceback in its output" if code == 0 else ""))
        return crashes

    def close(self) -> None:
        """Kill whatever still runs (each in its own process group) and keep every log."""
        if self.closed:
            return
        self.closed = True
        for i, worker in enumerate(self.processes):
            worker.kill()
            (self.logs / f"worker{worker.slot}-process{i}.log").write_text(worker.output + "\n", encoding="utf-8")
        self.coordinator.kill()
        (self.logs / "coordinator.log").write_text(self.coordinator.output + "\n", encoding="utf-8")


def verdict(faulty: dict[str, Any], clean: dict[str, Any]) -> dict[str, Any]:
    ratio = faulty["val_loss"] / clean["val_loss"]
    checks = {
        "training_never_stops": faulty["longest_step_gap_s"] <= STALL_LIMIT_S,
        "no_stage_unserved_over_30s": faulty["longest_unserved_s"] <= STALL_LIMIT_S,
        "survivors_never_crash": not faulty["crashes"] and not clean["crashes"],
        "val_loss_within_5pct": abs(ratio - 1) <= LOSS_TOLERANCE,
    }
    return {"val_loss_ratio": round(ratio, 4), "checks": checks, "passed": all(checks.values())}


def table(faulty: dict[str, Any], clean: dict[str, Any], summary: dict[str, Any]) -> str:
    rows = [
        ("seconds of training", "seconds", "{:,.0f}"),
        ("tokens trained", "tokens", "{:,}"),
        ("tokens/s", "tokens_per_s", "{:,.0f}"),
        ("stage-0 steps", "stage0_steps", "{:,}"),
        ("longest stage-0 step gap (s)", "longest_step_gap_s", "{:.2f}"),
        ("longest stage unserved (s)", "longest_unserved_s", "{:.2f}"),
        ("kills / restarts", None, None),
        ("crashes of survivors", None, None),
        ("validation loss (seed's model)", "seed_val_loss", "{:.4f}"),
        ("validation loss", "val_loss", "{:.4f}"),
    ]
    lines = [f"{'':32} {'faulty':>14} {'fault-free':>14}"]
    for label, key, fmt in rows:
        if key is None:
            values = [f"{r['kills']} / {r['restarts']}" if label.startswith("kills") else str(len(r["crashes"]))
                      for r in (faulty, clean)]
        else:
            values = [fmt.format(r[key]) for r in (faulty, clean)]
        lines.append(f"{label:32} {values[0]:>14} {values[1]:>14}")
    lines.append(f"validation loss ratio (faulty / fault-free): {summary['val_loss_ratio']:.4f}")
    lines += [f"  {'PASS' if ok else 'FAIL'}  {name.replace('_', ' ')}" for name, ok in summary["checks"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the faulty run (default 10)")
    parser.add_argument("--kill-every", type=float, default=30.0, help="seconds between kills (default 30)")
    parser.add_argument("--restart-after", type=float, default=10.0,
                        help="seconds from a kill to the worker's restart (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="picks the workers to kill (default 0)")
    parser.add_argument("--workers", type=int, default=6, help="CPU workers (default 6)")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json", help="JSON results file")
    parser.add_argument("--logs", type=Path, help="folder for the processes' logs (default: a new temporary one)")
    args = parser.parse_args(argv)
    if not 0 < args.restart_after < args.kill_every:
        parser.error("--restart-after must be more than 0 and less than --kill-every")
    if args.workers < 3:
        parser.error("--workers must be 3 or more: a pipeline that keeps a replica while one is down")

    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    os.environ["OMP_NUM_THREADS"] = "1"  # the workers share this machine's cores
    logs = args.logs or Path(tempfile.mkdtemp(prefix="swarmtrain-soak-"))
    seconds = args.minutes * 60
    previous = signal.signal(signal.SIGTERM, _interrupt)
    runs: list[SoakRun] = []
    try:
        faults = kill_schedule(seconds, args.kill_every, args.restart_after, args.workers, args.seed)
        progress(f"faulty run: {args.workers} workers, {len(faults) // 2} kills over {args.minutes:g} min "
                 f"(logs in {logs})")
        runs.append(SoakRun("faulty", logs, args.workers))
        faulty = runs[-1].run(seconds=seconds, target_tokens=None, faults=faults, limit_s=seconds)
        runs[-1].close()
        progress(f"fault-free run: until {faulty['tokens']:,} tokens")
        runs.append(SoakRun("fault-free", logs, args.workers))
        clean = runs[-1].run(seconds=None, target_tokens=faulty["tokens"], faults=[], limit_s=3 * seconds)
        runs[-1].close()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the swarm", flush=True)
        return 130
    finally:
        for run in runs:
            with contextlib.suppress(Exception):
                run.close()
        signal.signal(signal.SIGTERM, previous)
        print(f"logs: {logs}", flush=True)
    summary = verdict(faulty, clean)
    result = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "faulty": faulty, "fault_free": clean, **summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(table(faulty, clean, summary), flush=True)
    print(f"results: {args.out}", flush=True)
    return 0 if summary["passed"] else 1


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the runs as Ctrl-C does


if __name__ == "__main__":
    sys.exit(main())
