"""Deterministic fault injection for real worker processes, keyed on training progress.

A schedule is a list of `Fault(at_step, action, worker)`: when the swarm's progress (the
number of optimizer steps stage 0 has written to its `--trace` files) reaches `at_step`, the
fault fires on worker `worker` (an index into the injector's list of processes). Actions:

  kill     SIGKILL of the worker's process group (its P2P daemon too): a vanished machine
  stop     SIGSTOP of the group: its peers see a silent peer, as behind a cut link
  resume   SIGCONT of the group: the link is back
  restart  a replacement process with the same command line (a volunteer starting again)
  slow     SIGSTOP/SIGCONT duty cycle for `seconds`: a peer that computes a fraction of the time

No root and no network shaping: signals work on any machine, in the default test run. Every
fault that fired is recorded with the step at which it fired and when.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from worker.telemetry.trace import read_trace

Action = Literal["kill", "stop", "resume", "restart", "slow"]
ACTIONS: tuple[str, ...] = ("kill", "stop", "resume", "restart", "slow")


class Target(Protocol):
    """What the injector needs of a worker: its process, the leader of its own process group."""

    proc: subprocess.Popen  # type: ignore[type-arg]


@dataclass(frozen=True)
class Fault:
    at_step: int
    action: Action
    worker: int
    seconds: float = 0.0  # slow: how long the duty cycle lasts
    running: float = 0.25  # slow: the share of each SLOW_PERIOD_S the peer runs

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown fault action {self.action!r}; expected one of {', '.join(ACTIONS)}")
        if self.action == "slow" and not (self.seconds > 0 and 0 < self.running < 1):
            raise ValueError("a slow fault needs seconds > 0 and 0 < running < 1")


@dataclass(frozen=True)
class Fired:
    fault: Fault
    step: int  # the progress when it fired (>= fault.at_step)
    time: float  # wall clock (as in trace events)
    pid: int  # the process it hit (the replacement's, for a restart)


SLOW_PERIOD_S = 0.4


def trace_steps(traces: Iterable[Path]) -> int:
    """Optimizer steps written as "step" events (stage 0 drives them) over these trace files."""
    return sum(sum(1 for e in read_trace(p) if e["event"] == "step") for p in traces if p.exists())


def signal_group(target: Target, sig: signal.Signals) -> None:
    """Signal the worker's whole process group (it was started in a session of its own)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(target.proc.pid, sig)


class FaultInjector:
    """Fires `faults` on `workers` as `progress()` reaches their steps; `respawn(i)` starts a
    replacement for worker i (same arguments) and the injector puts it in `workers[i]`."""

    def __init__(self, faults: Iterable[Fault], workers: list[Target], progress: Callable[[], int],
                 respawn: Callable[[int], Target] | None = None) -> None:
        self.pending = sorted(faults, key=lambda f: f.at_step)  # stable: same step keeps its order
        self.workers, self.progress, self.respawn = workers, progress, respawn
        self.fired: list[Fired] = []
        self._slowing: list[tuple[threading.Thread, threading.Event]] = []

    @property
    def done(self) -> bool:
        return not self.pending

    def poll(self) -> list[Fired]:
        """Fire every pending fault whose step has come; the ones fired now."""
        if not self.pending:
            return []
        step = self.progress()
        now: list[Fired] = []
        while self.pending and self.pending[0].at_step <= step:
            fault = self.pending.pop(0)
            now.append(Fired(fault, step, round(time.time(), 3), self._fire(fault)))
        self.fired.extend(now)
        return now

    def run(self, timeout: float, poll_s: float = 0.05, until: Callable[[], bool] | None = None) -> None:
        """Poll until every fault fired (and `until()` holds, if given); TimeoutError names the next one."""
        deadline = time.monotonic() + timeout
        while not (self.done and (until is None or until())):
            self.poll()
            if time.monotonic() > deadline:
                next_one = self.pending[0] if self.pending else "the condition after the faults"
                raise TimeoutError(f"timed out after {timeout:.0f}s at step {self.progress()} waiting for {next_one}")
            time.sleep(poll_s)

    def close(self) -> None:
        """End any slow duty cycle still running (it leaves its peer running)."""
        for thread, stop in self._slowing:
            stop.set()
            thread.join(5)

    def _fire(self, fault: Fault) -> int:
        target = self.workers[fault.worker]
        if fault.action == "kill":
            signal_group(target, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                target.proc.wait(10)
        elif fault.action == "stop":
            signal_group(target, signal.SIGSTOP)
        elif fault.action == "resume":
            signal_group(target, signal.SIGCONT)
        elif fault.action == "restart":
            if self.respawn is None:
                raise ValueError("a restart fault needs the injector's respawn function")
            if target.proc.poll() is None:
                raise RuntimeError(f"restart of worker {fault.worker}: it is still running (kill it first)")
            target = self.workers[fault.worker] = self.respawn(fault.worker)
        elif fault.action == "slow":
            stop = threading.Event()
            thread = threading.Thread(target=_duty_cycle, args=(target, fault, stop), daemon=True)
            thread.start()
            self._slowing.append((thread, stop))
        return target.proc.pid


def _duty_cycle(target: Target, fault: Fault, stop: threading.Event) -> None:
    ends = time.monotonic() + fault.seconds
    try:
        while time.monotonic() < ends and not stop.is_set() and target.proc.poll() is None:
            signal_group(target, signal.SIGSTOP)
            stop.wait(SLOW_PERIOD_S * (1 - fault.running))
            signal_group(target, signal.SIGCONT)
            stop.wait(SLOW_PERIOD_S * fault.running)
    finally:
        signal_group(target, signal.SIGCONT)  # never leave a peer frozen
