"""Load benchmark: N simulated workers heartbeat a real coordinator process on loopback.

    python tests/benchmarks/bench_coordinator_load.py [--workers 1000 10000] [--seconds 20]

For each fleet size a fresh coordinator (gptj-6b preset, its own state dir) admits N workers
through Join, then N asyncio clients beat as fast as the coordinator answers, with
`--concurrency` calls in flight, for a fixed time. Reported: joins/s, heartbeats/s and
p50/p99 heartbeat latency. Client and server share this machine's cores, so the numbers
are a floor for a coordinator on its own host. Results go to tests/benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from protos import swarmtrain_pb2 as pb
from protos import swarmtrain_pb2_grpc as pb_grpc
from tests.harness.coordinator_process import CoordinatorProcess, make_profile

RESULTS = ROOT / "tests" / "benchmarks" / "results"


async def _join_all(stub: pb_grpc.CoordinatorStub, n: int, concurrency: int) -> list[pb.JoinResponse]:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> pb.JoinResponse:
        # a mixed fleet: memory from 6 to 24 GiB, 2-20 TFLOP/s, 20 Mbit/s - 1 Gbit/s
        profile = make_profile(memory_bytes=(6 + i % 19) * 2**30, achieved_flops=2e12 + (i % 10) * 2e12,
                               bandwidth_bps=2e7 * (1 + i % 50))
        async with gate:
            return await stub.Join(pb.JoinRequest(profile=profile), timeout=60)

    return await asyncio.gather(*(one(i) for i in range(n)))


async def _beat_for(stub: pb_grpc.CoordinatorStub, joined: list[pb.JoinResponse], seconds: float,
                    concurrency: int) -> list[float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client(offset: int) -> None:
        i = offset
        while time.perf_counter() < deadline:
            j = joined[i % len(joined)]
            request = pb.HeartbeatRequest(
                worker_id=j.worker_id, session_token=j.session_token, plan_version=1 << 40,
                counters=pb.Counters(tokens=2048, samples=16, compute_seconds=0.5, wait_seconds=0.1),
            )
            started = time.perf_counter()
            await stub.Heartbeat(request, timeout=30)
            latencies.append(time.perf_counter() - started)
            i += concurrency

    await asyncio.gather(*(client(k) for k in range(concurrency)))
    return latencies


async def _measure(endpoint: str, n: int, seconds: float, concurrency: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        started = time.perf_counter()
        joined = await _join_all(stub, n, concurrency)
        join_s = time.perf_counter() - started
        swarm = await stub.GetSwarm(pb.GetSwarmRequest(), timeout=60)
        started = time.perf_counter()
        latencies = await _beat_for(stub, joined, seconds, concurrency)
        elapsed = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100)
    return {
        "workers": n,
        "stages": len(swarm.stages),
        "joins_per_s": n / join_s,
        "heartbeats": len(latencies),
        "heartbeats_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * q[98],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--seconds", type=float, default=20.0, help="heartbeat phase length per fleet size")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight")
    args = parser.parse_args()
    rows = []
    for n in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            process = CoordinatorProcess(
                Path(tmp) / "state", "--set", "coordinator.heartbeat_timeout_s=600",
                "--set", "coordinator.lease_s=600", "--set", "coordinator.run_id=load", config="gptj-6b",
            )
            try:
                rows.append(asyncio.run(_measure(process.endpoint, n, args.seconds, args.concurrency)))
            finally:
                process.kill()
        r = rows[-1]
        print(f"{r['workers']:>6} workers · {r['stages']} stages · joins {r['joins_per_s']:,.0f}/s · "
              f"heartbeats {r['heartbeats_per_s']:,.0f}/s · p50 {r['p50_ms']:.1f} ms · p99 {r['p99_ms']:.1f} ms",
              flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "coordinator_load.json"
    out.write_text(json.dumps({"concurrency": args.concurrency, "seconds": args.seconds, "rows": rows}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
