"""Every process a coordinator or a worker starts dies with it, SIGKILL included.

Both roles start helpers that outlive a crash unless something reaps them: hivemind's DHT runs
in a forked child, and every hivemind P2P instance is a `p2pd` daemon (a Go binary, started by
hivemind without a parent-death signal). A `kill -9` of the parent leaves them running, holding
the DHT port and the peer id, so a restart on the same ports meets its own orphan.

`guard_descendants()` forks a small guard process before the helpers exist. It notes, a few
times a second, every process descended from its parent (pid and start time, so a reused pid is
never mistaken for one of ours), and when the parent is gone, however it died, it SIGKILLs
every one of them that still lives, and exits. It shares the parent's process group, so a
signal to the whole group reaches it too, and it ignores the SIGINT/SIGTERM such a signal
carries: it leaves by itself, once its parent has. Shared by the coordinator and the worker.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

POLL_S = 0.25  # how often the guard looks: a crash's orphans are gone within about this long

_PROC = Path("/proc")


def guard_descendants(poll_s: float = POLL_S) -> int | None:
    """Fork the guard of this process's descendants; its pid, or None where there is no /proc.
    Call it early, before threads and helper processes start (a fork copies only this thread)."""
    if not (_PROC / "self" / "stat").exists():
        return None
    owner = os.getpid()
    pid = os.fork()
    if pid != 0:
        return pid
    try:  # the guard: only os calls from here on, and never a return into the caller's code
        _detach_from_terminal_io()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        _watch(owner, poll_s)
    finally:
        os._exit(0)


def _detach_from_terminal_io() -> None:
    """The guard must not keep the owner's stdout open: whoever reads it waits for end-of-file."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _watch(owner: int, poll_s: float) -> None:
    me = os.getpid()
    owner_start = start_time(owner)
    seen: dict[int, int] = {}  # pid -> start time, of every descendant noticed
    while os.getppid() == owner:
        for pid in descendants(owner):
            if pid != me and pid not in seen:
                started = start_time(pid)
                if started is not None:
                    seen[pid] = started
        time.sleep(poll_s)
    # the owner is gone: its children now belong to init (or a subreaper). Those started too
    # recently to be noticed are found as the owner's process group's reparented members, with
    # everything below them.
    adopted_by, group = os.getppid(), os.getpgid(0)
    table = process_table()
    for pid, (parent, pgid, started) in table.items():
        if (pid != me and parent == adopted_by and pgid == group
                and owner_start is not None and started >= owner_start):
            seen.setdefault(pid, started)
            for below in descendants(pid, table):
                seen.setdefault(below, table[below][2])
    for pid, started in seen.items():
        if start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _stat_fields(pid: int | str) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses)."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def start_time(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot; None if it does not exist."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def process_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, process group, start time) of every process now."""
    table = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(entry.name)
            if fields:
                table[int(entry.name)] = (int(fields[1]), int(fields[2]), int(fields[19]))
    return table


def descendants(root: int, table: dict[int, tuple[int, int, int]] | None = None) -> list[int]:
    """Every living process below `root` in the process tree (of `table`, or of now)."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in (table if table is not None else process_table()).items():
        children.setdefault(parent, []).append(pid)
    found, frontier = [], [root]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.append(child)
            frontier.append(child)
    return found
