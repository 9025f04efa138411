"""Prediction benchmark: the rate model's forecast of a live swarm's tokens/s beside what it trains.

    sudo .venv/bin/python tests/benchmarks/bench_prediction.py [--presets tiny,small] [--workers 4,6] \
        [--rates none,20] [--seconds 60] [--repeat 1]

Each case is a coordinator and N CPU workers, each process in its own network namespace
(tests/benchmarks/netbed.py), links unshaped ("none") or shaped with `tc ... tbf` to a rate in
Mbit/s each way, the workers capped in memory so that the planner makes two stages. Each
worker declares its link (--link-mbps): the shaped rate, or on unshaped links what the P2P data
plane itself was measured to move on this machine (`data_plane_mbps`). Over a
window of --seconds from the first trained token it samples, every 2 s, the coordinator's
`progress.expected_tokens_per_second` (coordinator/swarm/forecast.py: the live workers where they
serve, at the compute rates their heartbeats measured, with the pipeline's fill and drain and
averaging's share of the links) and the trained tokens. It prints the median forecast of the
window's second half, the rate measured over that half (and over the whole window), their
ratio, and the plan's own figure (its slowest stage, as if the pipeline were always full) for
comparison. The target is a forecast within 15% of the measured rate. Results go to
tests/benchmarks/results/prediction.json. Needs root (namespaces, tc).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_slow_links import (
    LAUNCH,
    RESULTS,
    _check_alive,
    _wait_first_tokens,
    _wait_ready,
    child_env,
    worker_memory,
)
from netbed import NetBed, NetBedError, check_prerequisites

TARGET = 0.15  # |forecast / measured - 1| that counts as a good prediction
SAMPLE_EVERY_S = 2.0
ECHOES = 25


def data_plane_mbps(preset: str) -> float:
    """What the P2P data plane itself moves on this machine, in Mbit/s each way: the median of
    ECHOES round trips of one micro-batch's fp32 hidden state between two daemons on loopback.
    An unshaped link is not infinite: serialising and relaying a tensor through the daemons takes
    time and CPU, and a worker on an unshaped bed declares this rate as its link."""
    import asyncio

    import torch
    from hivemind.proto import runtime_pb2

    from configs.loader import load_config
    from tests.harness.loopback import loopback_peers
    from worker.pipeline.wire import Payload, read_frames, request_frames, response_frames

    training, model = load_config(preset).training, load_config(preset).model
    hidden = torch.randn(training.micro_batch_size, training.seq_len, model.d_model)

    async def measure() -> float:
        async with loopback_peers(2) as (server, caller):
            async def echo(requests: Any, _: object) -> Any:
                received = await read_frames(requests, max_bytes=1 << 30)
                assert received is not None
                for frame in response_frames(Payload(received.payload.tensors), "none"):
                    yield frame

            await server.add_protobuf_handler("echo", echo, runtime_pb2.ExpertRequest, stream_input=True,
                                              stream_output=True)
            times = []
            for _ in range(ECHOES):
                async def requests() -> Any:
                    for frame in request_frames("bench", Payload([hidden]), "none"):
                        yield frame

                began = time.perf_counter()
                stream = await caller.iterate_protobuf_handler(server.peer_id, "echo", requests(),
                                                               runtime_pb2.ExpertResponse)
                await read_frames(stream, max_bytes=1 << 30)
                times.append(time.perf_counter() - began)
            return 2 * hidden.numel() * 4 * 8 / statistics.median(times) / 1e6

    return asyncio.run(measure())


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_case(preset: str, workers: int, rate: float | None, seconds: float, subnet: str, logs: Path,
             unshaped_mbps: float) -> dict[str, Any]:
    import grpc

    from protos import swarmtrain_pb2 as pb
    from protos import swarmtrain_pb2_grpc as pb_grpc

    bed = NetBed(workers + 1, rate, subnet)
    channel = None
    link = f"{rate or unshaped_mbps:.0f}"  # what each worker tells the coordinator of its link
    try:
        bed.create()
        env = child_env()
        coordinator = bed.popen(0, [sys.executable, LAUNCH, "coordinator", "--config", preset, "--host", bed.address(0),
                                    "--grpc-port", "0", "--dht-port", "0", "--metrics-port", "0",
                                    "--state-dir", str(logs / "coordinator-state")], logs / "coordinator.log", env)
        endpoint = _wait_ready(coordinator, logs / "coordinator.log")
        procs = [coordinator] + [
            bed.popen(1 + i, [sys.executable, LAUNCH, "worker", "--cpu", "--coordinator", endpoint,
                              "--host", bed.address(1 + i), "--max-memory", worker_memory(preset),
                              "--link-mbps", link, "--public-name", f"bench-{i}"], logs / f"worker{i}.log", env)
            for i in range(workers)]
        channel = grpc.insecure_channel(endpoint)
        stub = pb_grpc.CoordinatorStub(channel)

        def swarm() -> Any:
            return stub.GetSwarm(pb.GetSwarmRequest(), timeout=10)

        start = _wait_first_tokens(lambda: swarm().progress.trained_tokens, procs, logs)
        tokens0, samples = swarm().progress.trained_tokens, []
        while time.monotonic() - start < seconds:
            _check_alive(procs, logs)
            time.sleep(SAMPLE_EVERY_S)
            now = swarm()
            samples.append({"t": round(time.monotonic() - start, 1), "tokens": now.progress.trained_tokens,
                            "expected": now.progress.expected_tokens_per_second,
                            "planned": now.progress.tokens_per_second,
                            "layout": [s.active_workers for s in now.stages]})
        elapsed = time.monotonic() - start
        measured = (samples[-1]["tokens"] - tokens0) / elapsed
        for proc in procs[::-1]:
            bed.stop(proc, timeout=20)
    finally:
        if channel is not None:
            channel.close()
        bed.destroy()
    # the forecast and the rate it is held against come from the same span: the window's second
    # half, once the first heartbeats have measured every worker and the compression settled
    late = [s for s in samples if s["t"] >= seconds / 2 and s["expected"] > 0]
    expected = statistics.median(s["expected"] for s in late) if late else None
    planned = statistics.median(s["planned"] for s in late) if late else None
    held = (late[-1]["tokens"] - late[0]["tokens"]) / (late[-1]["t"] - late[0]["t"]) if len(late) > 1 else None
    return {"preset": preset, "workers": workers, "rate_mbit": rate, "declared_mbit": float(link),
            "window_s": round(elapsed, 1),
            "measured_tokens_per_s": measured, "measured_second_half_tokens_per_s": held,
            "expected_tokens_per_s": expected, "planned_tokens_per_s": planned,
            "expected_over_measured": expected / held if expected and held else None,
            "planned_over_measured": planned / held if planned and held else None,
            "layout": samples[-1]["layout"] if samples else [], "samples": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_prediction", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--workers", default="4,6", help="worker counts, comma-separated (default 4,6)")
    parser.add_argument("--rates", default="none,20", help="link rates in Mbit/s, 'none' unshaped (default none,20)")
    parser.add_argument("--seconds", type=float, default=60.0, help="window per case (default 60)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--subnet", default="10.78.0.0/24")
    parser.add_argument("--out", type=Path, default=RESULTS / "prediction.json")
    args = parser.parse_args(argv)
    try:
        presets = [p for p in args.presets.split(",") if p]
        counts = [int(n) for n in args.workers.split(",") if n]
        rates = [None if r == "none" else float(r) for r in args.rates.split(",") if r]
    except ValueError as err:
        parser.error(f"--workers/--rates: {err}")
    if any(n < 2 for n in counts) or args.seconds <= 10 or args.repeat < 1:
        parser.error("--workers must be 2 or more, --seconds more than 10, --repeat 1 or more")
    try:
        check_prerequisites()
    except NetBedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    plane = {preset: data_plane_mbps(preset) for preset in presets}
    for preset, mbps in plane.items():
        progress(f"the data plane moves {mbps:,.0f} Mbit/s each way on this machine ({preset}'s micro-batch, "
                 "two daemons on loopback): what workers on unshaped links declare")
    results = []
    for _ in range(args.repeat):
        for preset in presets:
            for count in counts:
                for rate in rates:
                    with tempfile.TemporaryDirectory(prefix="swarmtrain-prediction-") as logs:
                        case = run_case(preset, count, rate, args.seconds, args.subnet, Path(logs), plane[preset])
                    results.append(case)
                    progress(f"{preset} × {count} workers, links {rate or 'unshaped'}: measured "
                             f"{case['measured_second_half_tokens_per_s'] or 0:,.0f} tokens/s (second half; "
                             f"{case['measured_tokens_per_s']:,.0f} over the window), forecast "
                             f"{case['expected_tokens_per_s'] or 0:,.0f} ({case['expected_over_measured'] or 0:.2f}×), "
                             f"slowest stage {case['planned_tokens_per_s'] or 0:,.0f} "
                             f"({case['planned_over_measured'] or 0:.2f}×), layout {case['layout']}")
    ratios = [r["expected_over_measured"] for r in results if r["expected_over_measured"]]
    summary = {"cases": len(results), "data_plane_mbps": plane, "median_expected_over_measured": statistics.median(ratios) if ratios else None,
               "worst_expected_over_measured": max(ratios, key=lambda x: abs(x - 1)) if ratios else None,
               "within_target": sum(abs(x - 1) <= TARGET for x in ratios)}
    print(json.dumps(summary, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "results": results}, indent=2) + "\n", encoding="utf-8")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
