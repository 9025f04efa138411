"""kill -9 a coordinator that 4 workers train under, restart it on the same state dir and ports,
and count the tries in which a fresh worker joins the restarted one and no orphan is left.

    python tests/benchmarks/bench_restarts.py [--tries 10] [--workers 4]

Each try is a clean run: a tiny-preset coordinator, `--workers` CPU workers (50 MiB each, so the
model is split), all assigned, then SIGKILL of the coordinator alone (its workers keep running on
their leases). A try counts as joined when the coordinator's own descendants (its DHT process
and P2P daemon) are all gone within 5 s, the restart on the same ports starts, and a fresh
worker found through the restarted coordinator's DHT multiaddr gets an assignment within 90 s.
Prints one line per try and the totals; writes tests/benchmarks/results/restarts.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from configs.process_guard import descendants, start_time  # noqa: E402
from tests.harness import processes  # noqa: E402
from tests.harness.coordinator_process import CoordinatorProcess, wait_for  # noqa: E402
from tests.harness.swarm import TRAINING_PACE  # noqa: E402
from tests.harness.worker_process import SMALL, Workers  # noqa: E402

RESULTS = ROOT / "tests" / "benchmarks" / "results" / "restarts.json"
GONE_S = 5.0


def one_try(folder: Path, n_workers: int) -> dict:
    workers = Workers(folder)
    first = second = None
    started = time.monotonic()
    try:
        first = CoordinatorProcess(folder / "state", *TRAINING_PACE)
        grpc_port = int(first.endpoint.rsplit(":", 1)[1])
        dht_addr = first.line_matching(r"^DHT: ").split()[1]
        dht_port = int(dht_addr.split("/tcp/")[1].split("/")[0])
        for _ in range(n_workers):
            workers.spawn("--coordinator", first.endpoint, "--host", "127.0.0.1", *SMALL)
        for worker in workers:
            worker.wait_event("assigned", timeout=90)
        helpers = {p: start_time(p) for p in descendants(first.proc.pid)}
        first.kill_9()
        try:
            wait_for(lambda: not [p for p, t in helpers.items() if t is not None and start_time(p) == t],
                     timeout=GONE_S, what="the killed coordinator's processes to end")
            orphans = 0
        except TimeoutError:
            orphans = len([p for p, t in helpers.items() if t is not None and start_time(p) == t])
        second = CoordinatorProcess(folder / "state", *TRAINING_PACE, "--grpc-port", str(grpc_port),
                                    "--dht-port", str(dht_port))
        peers = second.line_matching(r"^DHT: ").split()[1]
        fresh = workers.spawn("--peers", peers, "--host", "127.0.0.1", *SMALL)
        try:
            fresh.wait_event("assigned", timeout=90)
            joined = True
        except AssertionError:
            joined = False
        return {"joined": joined, "orphans": orphans, "same_peer": peers == dht_addr,
                "seconds": round(time.monotonic() - started, 1)}
    finally:
        workers.kill_all()
        for c in (first, second):
            if c is not None:
                c.kill()
        processes.reap_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=10)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    tries = []
    for i in range(args.tries):
        with tempfile.TemporaryDirectory(prefix="swarmtrain-restart-") as folder:
            result = one_try(Path(folder), args.workers)
        tries.append(result)
        print(f"try {i + 1}: {'joined' if result['joined'] else 'NOT joined'} · orphans {result['orphans']} · "
              f"same DHT address {result['same_peer']} · {result['seconds']:.0f}s", flush=True)
    joined = sum(t["joined"] and t["orphans"] == 0 for t in tries)
    print(f"{joined} of {len(tries)} tries: a fresh worker joined the restarted coordinator, no orphan left")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.platform(), "workers": args.workers,
                                   "tries": tries, "clean_joins": joined}, indent=2) + "\n")


if __name__ == "__main__":
    main()
