"""Start a swarmtrain entry point by role: `slow_links_launch.py worker|coordinator ARGS...`.

The benchmark's swarm processes run through this launcher so that their command lines name
this file rather than `worker.app.cli` / `coordinator.app.cli`: a `pkill -f worker.app.cli` run by
someone else on a shared machine then leaves a benchmark in progress alone.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

if __name__ == "__main__":
    role, args = sys.argv[1], sys.argv[2:]
    if role not in ("worker", "coordinator"):
        raise SystemExit(f"unknown role {role!r}: worker or coordinator")
    sys.exit(importlib.import_module(f"{role}.app.cli").main(args))
