"""The swarm page at scale: serve times and size of /status and /status.json, and what a refresh costs.

    python tests/benchmarks/bench_status.py [--workers 1000] [--requests 50]

For each fleet size a real coordinator (gptj-6b preset, its own state dir) admits N workers
(a mixed fleet, as bench_coordinator_load.py joins it). Then, with the swarm registered:
- /status.json and /status are fetched `--requests` times each from the metrics port: median
  and p99 milliseconds, and the JSON's size (the issue's bounds: under 100 ms, under 1 MB);
- what the coordinator does each second to refresh the page's data, on its event loop: a
  GetSwarm view (timed as the GetSwarm call's latency) and turning it into the status document
  (timed here, the same code: coordinator/api/status.py). Their sum is the loop time per second.
Client and server share this machine's cores. Results go to tests/benchmarks/results/status.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from coordinator.api.status import swarm_status
from protos import swarmtrain_pb2 as pb
from protos import swarmtrain_pb2_grpc as pb_grpc
from tests.harness.coordinator_process import CoordinatorProcess, make_profile, wait_for

RESULTS = ROOT / "tests" / "benchmarks" / "results" / "status.json"
CONCURRENCY = 64


async def join_all(endpoint: str, n: int) -> None:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(i: int) -> None:
            profile = make_profile(memory_bytes=(6 + i % 19) * 2**30, achieved_flops=2e12 + (i % 10) * 2e12,
                                   bandwidth_bps=2e7 * (1 + i % 50), name=f"volunteer-{i:05d}")
            async with gate:
                await stub.Join(pb.JoinRequest(profile=profile), timeout=60)

        await asyncio.gather(*(one(i) for i in range(n)))


def timed_get(url: str) -> tuple[float, int]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as reply:
        size = len(reply.read())
    return time.perf_counter() - started, size


def summary(seconds: list[float]) -> dict[str, float]:
    return {"median_ms": 1000 * statistics.median(seconds),
            "p99_ms": 1000 * statistics.quantiles(seconds, n=100)[98] if len(seconds) > 1 else 1000 * seconds[0]}


def measure(n: int, requests: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="swarmtrain-bench-status-") as state:
        coordinator = CoordinatorProcess(Path(state), "--set", "coordinator.heartbeat_timeout_s=600",
                                         "--set", "coordinator.lease_s=600", config="gptj-6b")
        try:
            page = coordinator.line_matching(r"^swarm page: http://").split()[-1]
            started = time.perf_counter()
            asyncio.run(join_all(coordinator.endpoint, n))
            join_s = time.perf_counter() - started
            wait_for(lambda: len(json.loads(urllib.request.urlopen(page + ".json", timeout=30).read())["workers"]) >= n,
                     timeout=60, what=f"{n} workers on /status.json", poll=0.5)
            as_json = [timed_get(page + ".json") for _ in range(requests)]
            as_page = [timed_get(page) for _ in range(requests)]
            views, builds = [], []
            for _ in range(min(requests, 20)):
                started = time.perf_counter()
                view = coordinator.swarm()
                views.append(time.perf_counter() - started)
                started = time.perf_counter()
                json.dumps(swarm_status(view, time.time()), separators=(",", ":"))
                builds.append(time.perf_counter() - started)
        finally:
            coordinator.kill()
    return {"workers": n, "join_s": join_s, "status_json": summary([t for t, _ in as_json]),
            "status_json_bytes": as_json[-1][1], "status_page": summary([t for t, _ in as_page]),
            "status_page_bytes": as_page[-1][1], "getswarm": summary(views), "build_status": summary(builds)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1000])
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    rows = []
    print(f"{'workers':>8} {'/status.json ms':>16} {'p99':>7} {'bytes':>10} {'/status ms':>11} "
          f"{'GetSwarm ms':>12} {'build ms':>9} {'refresh/s':>10}")
    for n in args.workers:
        row = measure(n, args.requests)
        rows.append(row)
        refresh = row["getswarm"]["median_ms"] + row["build_status"]["median_ms"]
        print(f"{n:>8} {row['status_json']['median_ms']:>16.2f} {row['status_json']['p99_ms']:>7.2f} "
              f"{row['status_json_bytes']:>10,} {row['status_page']['median_ms']:>11.2f} "
              f"{row['getswarm']['median_ms']:>12.1f} {row['build_status']['median_ms']:>9.1f} {refresh:>9.1f}ms",
              flush=True)
        ok = row["status_json"]["median_ms"] < 100 and row["status_json_bytes"] < 1e6
        print(f"         bounds (median under 100 ms, JSON under 1 MB): {'hold' if ok else 'DO NOT hold'}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows}, indent=2))
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
