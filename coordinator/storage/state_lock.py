"""One coordinator per state dir: an OS file lock held for the process's life.

Two coordinators on one registry would each believe it owns the plan and the peer id. The lock
is `flock` on a file in the state dir: the kernel drops it when the holder dies, however it
dies, so a crash never leaves a stale lock to clear by hand. The file holds the holder's pid,
for the message a second coordinator prints.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "coordinator.lock"


class StateDirBusy(Exception):
    """Another live coordinator holds the state dir."""


class StateDirLock:
    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise StateDirBusy naming the holder; OSError if the dir is unusable."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f"coordinator pid {holder}" if holder.isdigit() else "another coordinator"
            raise StateDirBusy(f"state dir {self.path.parent} is in use by {who}: stop it first, "
                               "or give this one another --state-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        # a forked child (hivemind's DHT process) would share the lock and keep it after a crash
        # of ours until it died too: it closes its copy (closing, unlike LOCK_UN, leaves ours held)
        os.register_at_fork(after_in_child=self._close_copy)

    def _close_copy(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock; the file stays for the next holder
            self._fd = None
