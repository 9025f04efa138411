"""`worker --trace FILE`: what the worker did, one JSON object per line, for analysis and tests.

Every optimizer step the first stage drives (its loss), every averaging round a replica takes
part in (with a digest of the parameters it ended with: replicas that agree print the same),
and each assignment. Lines are appended and flushed at once, so a killed worker's trace is
complete up to its last event, and `tail -f` follows a live one.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import IO, Any


class Trace:
    """Appends events to a file; a Trace without a path writes nothing."""

    def __init__(self, path: Path | None = None) -> None:
        self._file: IO[str] | None = path.open("a", encoding="utf-8") if path is not None else None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def write(self, event: str, **fields: Any) -> None:
        if self._file is None:
            return
        line = json.dumps({"event": event, "time": round(time.time(), 3), **fields}, allow_nan=True)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read_trace(path: Path) -> list[dict[str, Any]]:
    """The events of a trace file, skipping a last line cut short by a kill."""
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events
