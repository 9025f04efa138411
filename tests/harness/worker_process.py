"""Start real `worker` processes and wait on what they do through their `--trace` events.

Every worker writes its trace (one JSON object per line: worker/telemetry/trace.py): the harness
adds `--trace FILE` unless the test passes its own. Tests wait on those events, which name
what happened in fields, not on the wording of the lines a volunteer reads; `lines` keeps the
output for failure messages and for the few tests whose subject is that wording.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness import processes
from tests.harness.coordinator_process import wait_for

Event = dict[str, Any]
# tiny's whole model peaks at ~57 MiB on a CPU worker and a stage of two layers at ~41 MiB
# (configs/memory.py: activations of 2 micro-batches in flight, averaging state): a worker capped
# at 50 MiB cannot hold it alone, two can as a pipeline
SMALL = ["--max-memory", "50MiB"]


class WorkerProcess:
    """One `worker --cpu` subprocess in its own session, so that kill() also reaps its P2P daemon."""

    def __init__(self, *args: str, trace_dir: Path | None = None, namespace: str | None = None) -> None:
        """`namespace`: a network namespace to run in (tests/harness/natbed.py)."""
        if "--trace" in args:
            self.trace_path = Path(args[args.index("--trace") + 1])
        else:
            folder = trace_dir or Path(tempfile.mkdtemp(prefix="swarmtrain-worker-"))
            fd, name = tempfile.mkstemp(prefix="worker-", suffix=".jsonl", dir=folder)
            os.close(fd)
            self.trace_path = Path(name)
            args = (*args, "--trace", name)
        self.lines: list[str] = []
        self._events: list[Event] = []
        # bytes of the trace parsed so far: a restarted worker appends to its predecessor's file,
        # and this process's events are only those written after it started
        self._read_to = self.trace_path.stat().st_size if self.trace_path.exists() else 0
        inside = ["ip", "netns", "exec", namespace] if namespace else []
        self.proc = processes.start(
            [*inside, sys.executable, "-m", "worker.app.cli", "--cpu", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    # ---- the trace ----------------------------------------------------------------------

    def events(self, name: str | None = None) -> list[Event]:
        """The trace's events so far (only those called `name`, if given); a line still being
        written is left for the next call."""
        if self.trace_path.exists():
            with self.trace_path.open("rb") as file:
                file.seek(self._read_to)
                data = file.read()
            complete = data[: data.rfind(b"\n") + 1]
            self._read_to += len(complete)
            for line in complete.splitlines():
                try:
                    self._events.append(json.loads(line))
                except ValueError:
                    continue  # a line cut short by a kill
        return [e for e in self._events if name is None or e["event"] == name]

    def mark(self) -> int:
        """How many events there are now: `wait_event(..., after=mark)` looks only at later ones."""
        return len(self.events())

    def wait_event(self, name: str, predicate: Callable[[Event], bool] | None = None, timeout: float = 30.0,
                   after: int = 0) -> Event:
        """The first event `name` from index `after` on for which `predicate` holds; fails at the
        deadline, or as soon as the worker exits without having written it."""

        def matching() -> Event | None:
            return next((e for e in self.events()[after:]
                         if e["event"] == name and (predicate is None or predicate(e))), None)

        def found() -> Event | None:
            exited = self.proc.poll() is not None  # before reading: its last events are on disk by then
            event = matching()
            if event is None and exited:
                self._pump_thread.join(5)
                raise AssertionError(f"worker exited ({self.proc.returncode}) before a {name!r} event:\n"
                                     f"{self._story()}")
            return event

        try:
            return wait_for(found, timeout=timeout, what=f"a {name!r} event")
        except TimeoutError as err:
            raise AssertionError(f"{err}; {self._story()}") from None

    def wait_exit(self, timeout: float = 30.0) -> Event:
        """The `exit` event of a worker that ends by itself; its code is the process's."""
        code = self.proc.wait(timeout)
        self._pump_thread.join(5)
        event = next(iter(self.events("exit")), None)
        assert event is not None, f"worker exited ({code}) without an 'exit' event:\n{self._story()}"
        assert event["code"] == code, (event, code)
        return event

    def _story(self) -> str:
        names = [e["event"] for e in self.events()]
        return f"events {names[-40:]}\nworker output:\n{self.output}"

    # ---- stopping -----------------------------------------------------------------------

    def terminate(self, timeout: float = 15.0) -> tuple[int, float]:
        """SIGTERM the worker alone, as a service manager would; its exit code and seconds taken.
        Its output is complete once this returns."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.wait(timeout)
        return code, time.monotonic() - started

    def wait(self, timeout: float) -> int:
        """The exit code once the worker has ended (subprocess.TimeoutExpired past `timeout`); its
        output is complete once this returns."""
        code = self.proc.wait(timeout)
        self._pump_thread.join(5)
        return code

    def kill(self) -> None:
        processes.reap(self.proc)


class Workers(list[WorkerProcess]):
    """The workers a test starts, their traces in the test's folder; the `workers` fixture
    (tests/conftest.py) reaps every one at the end."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def spawn(self, *args: str) -> WorkerProcess:
        worker = WorkerProcess(*args, trace_dir=self.folder)
        self.append(worker)
        return worker

    def kill_all(self) -> None:
        for worker in self:
            worker.kill()

