"""Every process the tests start, each in a session of its own: one killpg reaps it and its children
(a worker's P2P daemon, a coordinator's DHT process), and the session fixture reaps what is left."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Any

from configs.process_guard import process_table

STARTED: list[subprocess.Popen] = []  # type: ignore[type-arg]


def start(args: list[str], **options: Any) -> subprocess.Popen:  # type: ignore[type-arg]
    """`subprocess.Popen(args)` in a new session, remembered for `reap_all`."""
    proc = subprocess.Popen(args, start_new_session=True, **options)
    STARTED.append(proc)
    return proc


def reap(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """SIGKILL the process's whole group (it leads one: `start` made it so) and wait for it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def reap_all() -> list[int]:
    """Reap every process `start` began, then any other child of this process (a P2P daemon, a
    process a test started by hand) with its group; the pids of those other children."""
    for proc in STARTED:
        reap(proc)
    STARTED.clear()
    ours = os.getpgid(0)
    survivors = []
    for pid in children_of(os.getpid()):
        survivors.append(pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            group = os.getpgid(pid)
            if group != ours:
                os.killpg(group, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    return survivors


def children_of(parent: int) -> list[int]:
    """The child processes of `parent` (exited ones not yet waited for included), read from /proc;
    empty where there is no /proc."""
    return [pid for pid, (ppid, _, _) in process_table().items() if ppid == parent]
